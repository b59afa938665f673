"""``hpo serve --workers N``: N processes of the app on one listening socket.

One Python process is the queue when many trials stream metrics at once: every report's
validation, pruning and SQL run on one interpreter. With ``--workers N`` the command becomes a
supervisor. It does once what must happen once (the database check, the schema upgrade, the
API token), binds the port, and starts N worker processes that inherit the socket; the kernel
hands each new connection to one of them. Each worker is the whole app on the same database,
as N replicas would be (the tested multi-server set-up), and only worker 0 runs the scheduler.

What the supervisor guarantees:

- A worker that exits when nobody asked it to (killed, or its start-up failed), or that has
  published nothing for ``HPO_WORKER_HANG_S`` (hung, or stopped with SIGSTOP: it is killed;
  at start-up it has ``START_S`` more),
  stops the others, and ``hpo serve`` exits with status 1 naming it: a process manager
  (systemd, Kubernetes) then restarts the whole server, never a server with a worker missing
  or one that answers for a scheduler that no longer runs.
- SIGTERM or SIGINT stops the workers (each finishes its requests; killed after
  ``stop_timeout_s``) and ``hpo serve`` exits with 0 when all of them did.
- A worker whose supervisor is gone (``kill -9``) is sent SIGTERM within a quarter of a
  second by a thread of its own, and ended 10 s later if still there, so no worker keeps
  serving the port alone.

The workers share a folder in the data directory, ``serve-<pid>``, that the supervisor makes
and removes (:class:`Siblings`; one left by a supervisor killed with its workers is removed at
the next start): each worker writes its own Prometheus series and its scheduler's role there
every second, so ``/metrics`` sums the series of all workers and ``/healthz`` names worker 0's
scheduler role whichever worker answers.

What stays per process: the rate limit (each worker counts its own, so N workers let N
times the burst through), the samplers' caches, the lock that makes asks of one study take
turns (across workers they race in the database, which hands each trial out once, as for
replicas), and the scheduler's wake-up: a study created or changed through worker 1..N-1 is
dispatched at the scheduler's next tick (``HPO_SCHEDULER_INTERVAL_S``, 1 s), not at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hpo.service.settings import Settings

log = logging.getLogger("hpo.serve")

# How the supervisor tells a worker who it is (the HPO_ prefix keeps them out of Ray's and
# the ranks' environments, with the rest of the control plane's variables).
ENV_INDEX = "HPO_SERVE_WORKER"
ENV_FD = "HPO_SERVE_FD"
ENV_PARENT = "HPO_SERVE_PARENT"
ENV_FOLDER = "HPO_SERVE_FOLDER"
# Exit status of a worker whose app did not start (its lifespan failed), and those of a
# worker that stopped as asked.
STARTUP_FAILED = 3
STOPPED = (0, -signal.SIGTERM, -signal.SIGINT)
# What a worker has to start (imports, the app's start-up), beyond HPO_WORKER_HANG_S, before
# it must have published for the first time.
START_S = 60.0


def log_format(worker: int | None = None) -> str:
    """The format of ``hpo serve``'s log lines (a worker's name its index)."""
    who = "" if worker is None else f"[worker {worker}] "
    return f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"


class Siblings:
    """The folder that the workers of one ``hpo serve --workers N`` share.

    Worker ``index`` writes ``<index>.json`` there (its Prometheus text, its scheduler's role
    and when it wrote them; replaced atomically, each write from a file of its own); every
    worker reads all of them. A file is at most ``interval_s`` old while its worker is
    healthy (it publishes that often, and once more when it answers a scrape)."""

    def __init__(self, folder: Path, index: int, *, interval_s: float = 1.0) -> None:
        self.folder = folder
        self.index = index
        self.interval_s = interval_s

    def publish(self, metrics_text: str, scheduler: str, *, placeholder: bool = False) -> None:
        """Replace this worker's file (nothing once the folder is gone: the server stops),
        marked with the time on the host's monotonic clock, which every process of the host
        shares; a ``placeholder`` (the supervisor's for worker 0,
        before it starts) has none, so it never looks hung."""
        at = None if placeholder else time.monotonic()
        entry = {"metrics": metrics_text, "scheduler": scheduler, "at": at}
        with contextlib.suppress(FileNotFoundError):
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(fd, "w") as out:
                json.dump(entry, out)
            os.replace(tmp, self.folder / f"{self.index}.json")

    def read(self) -> dict[int, dict[str, Any]]:
        """Every worker's last file by index (fewer before all of them have published)."""
        found = {}
        for path in self.folder.glob("*.json"):
            try:
                found[int(path.stem)] = json.loads(path.read_text())
            except (OSError, ValueError):  # removed at shutdown
                continue
        return found

    def scheduler_role(self) -> str:
        """The role of worker 0's scheduler (``running``, ``standby`` or ``off``: the server's
        scheduler is off); the supervisor writes what it starts as before worker 0 is up."""
        return str(self.read().get(0, {}).get("scheduler", "standby"))


def folder_for(data_dir: Path) -> Path:
    """A new shared folder in ``data_dir``, named after this supervisor's pid; the folders of
    supervisors no longer running (killed with their workers) are removed first."""
    for old in data_dir.glob("serve-*"):
        pid = old.name.removeprefix("serve-")
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = data_dir / f"serve-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)  # a pid reused
    folder.mkdir(mode=0o700, parents=True)
    return folder


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def supervise(
    settings: Settings,
    env: dict[str, str],
    workers: int,
    *,
    stop_timeout_s: float = 30.0,
) -> int:
    """Run ``workers`` worker processes on ``settings``' host and port until a signal stops
    them (0), or one of them exits by itself or publishes nothing for
    ``settings.worker_hang_s`` (1). ``env`` is their environment (the CLI's options as
    ``HPO_*`` variables among it). The caller has checked the database and made the API
    token."""
    from hpo.service.db import make_engine, upgrade_schema

    if settings.resolved_database_url.startswith("sqlite"):
        log.warning(
            "%d workers on SQLite: their writes take turns on the file's lock, so more "
            "processes do not make them faster (PostgreSQL is where --workers helps)",
            workers,
        )
    engine = make_engine(settings.resolved_database_url)
    try:  # once here, not raced by N workers
        upgrade_schema(engine)
    finally:
        engine.dispose()
    try:
        listeners = _listen(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return 1
    folder = folder_for(settings.data_dir)
    # Set by SIGTERM/SIGINT. A plain list, not an Event: a handler that takes a lock the
    # interrupted main thread holds would wait for ever.
    stopping: list[int] = []
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda sig, _: stopping.append(sig)) for sig in signals}
    procs: list[subprocess.Popen] = []
    fds = [sock.fileno() for sock in listeners]
    try:
        # what worker 0's scheduler is until it says (the others answer /healthz with it)
        Siblings(folder, 0).publish(
            "", "standby" if settings.scheduler else "off", placeholder=True
        )
        for index in range(workers):
            child = {
                **env,
                ENV_INDEX: str(index),
                ENV_FD: ",".join(map(str, fds)),
                ENV_PARENT: str(os.getpid()),
                ENV_FOLDER: str(folder),
            }
            if index > 0:
                child["HPO_SCHEDULER"] = "false"  # one scheduler per server
            procs.append(
                subprocess.Popen([sys.executable, "-m", "hpo.api.serving"], env=child, pass_fds=fds)
            )
        for sock in listeners:
            sock.close()  # the workers hold them
        log.info("%d workers started (pids %s)", workers, ", ".join(str(p.pid) for p in procs))
        failed = _watch(procs, Siblings(folder, -1), settings.worker_hang_s, stopping)
        if failed is not None and stopping and procs[failed].returncode in STOPPED:
            failed = None  # stopped by the same signal as this process, a moment earlier
        clean = _stop(procs, stop_timeout_s)
        return 1 if failed is not None or not clean else 0
    finally:
        _stop(procs, stop_timeout_s)  # a start that failed half-way
        for sock in listeners:
            sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)


def _watch(
    procs: list[subprocess.Popen], siblings: Siblings, hang_s: float, stopping: list[int]
) -> int | None:
    """Wait until a signal comes (None) or a worker exits or hangs (its index; a hung worker
    is killed, since SIGTERM does not reach a stopped process)."""
    started = time.monotonic()
    while not stopping:
        time.sleep(0.2)
        for index, proc in enumerate(procs):
            if proc.poll() is not None:
                log.error(
                    "worker %d (pid %d) exited with status %s; stopping the others",
                    index,
                    proc.pid,
                    proc.returncode,
                )
                return index
        now = time.monotonic()
        published = siblings.read()
        for index in range(len(procs)):
            at = published.get(index, {}).get("at")
            # before its first file, a worker has START_S more, to start
            since, limit = (started, hang_s + START_S) if at is None else (at, hang_s)
            if now - since > limit:
                log.error(
                    "worker %d (pid %d) published nothing for %.0f s (hung or stopped); "
                    "killing it and stopping the others",
                    index,
                    procs[index].pid,
                    now - since,
                )
                procs[index].kill()
                procs[index].wait()
                return index
    return None


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` names (``""``: every interface, IPv4 and
    IPv6), as asyncio's server binds them for ``hpo serve`` with one process."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # or it takes the IPv4 port too
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def _stop(procs: list[subprocess.Popen], timeout_s: float) -> bool:
    """SIGTERM every worker still running, SIGKILL those not gone after ``timeout_s``; whether
    every worker ended cleanly (status 0, or the SIGTERM or SIGINT that stopped it)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    clean = True
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker pid %d did not stop in %.0f s; killed", proc.pid, timeout_s)
            proc.kill()
            proc.wait()
        clean = clean and proc.returncode in STOPPED
    return clean


def _watch_parent(parent: int, folder: Path, grace_s: float = 10.0) -> None:
    """SIGTERM this process when its supervisor is gone (its parent changes), and end it
    ``grace_s`` later if it is still there. The shared folder goes first: nobody else will
    remove it."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.25)
        log.error("hpo serve (pid %d) is gone; this worker stops", parent)
        shutil.rmtree(folder, ignore_errors=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="hpo-parent-watch", daemon=True).start()


def worker_main() -> int:
    """One worker: the app on the inherited socket (run by :func:`supervise`)."""
    index = int(os.environ.pop(ENV_INDEX))
    fds = [int(fd) for fd in os.environ.pop(ENV_FD).split(",")]
    parent = int(os.environ.pop(ENV_PARENT))
    folder = Path(os.environ.pop(ENV_FOLDER))
    _watch_parent(parent, folder)  # before the imports: a supervisor killed meanwhile is seen too
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format=log_format(index))

    import uvicorn

    from hpo.api.app import create_app

    app = create_app(settings, freeze_heap=True, siblings=Siblings(folder, index))
    server = uvicorn.Server(uvicorn.Config(app, log_level=settings.log_level))
    # Once stopped, uvicorn raises again the signal that stopped it: SIGTERM ends the process
    # (status -15); Ctrl-C, which a terminal sends to every worker too, is a KeyboardInterrupt.
    sockets = [socket.socket(fileno=fd) for fd in fds]
    for sock in sockets:
        sock.set_inheritable(False)  # not into the processes this one starts (Ray's)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets)
    return 0 if server.started else STARTUP_FAILED


if __name__ == "__main__":
    sys.exit(worker_main())
