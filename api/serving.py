"""``hpo serve --workers N``: N processes of the app on one listening socket.

One Python process is the queue when many trials stream metrics at once: every report's
validation, pruning and SQL run on one interpreter. With ``--workers N`` the command becomes a
supervisor. It does once what must happen once (the database check, the schema upgrade, the
API token), binds the port, and starts N worker processes that inherit the socket; the kernel
hands each new connection to one of them. Each worker is the whole app on the same database,
as N replicas would be (the tested multi-server set-up), and only worker 0 runs the scheduler.

What the supervisor guarantees:

- A worker that exits when nobody asked it to (killed, or its start-up failed), or whose
  event loop has not beaten for ``HPO_WORKER_HANG_S`` (hung, or stopped with SIGSTOP: it is
  killed; at start-up it has ``START_S`` more), stops the others, and ``hpo serve`` exits
  with status 1 naming it: a process manager (systemd, Kubernetes) then restarts the whole
  server, never a server with a worker missing or one that answers for a scheduler that no
  longer runs. Each worker beats once a second on a pipe of its own; the supervisor times the
  beats on its own clock, so a pause of the whole server (Ctrl-Z, ``docker pause``) is not
  taken for a hang.
- SIGTERM or SIGINT stops the workers (each finishes its requests; killed after
  ``stop_timeout_s``) and ``hpo serve`` exits with 0 when all of them did.
- A worker whose supervisor is gone (``kill -9``) is sent SIGTERM within a quarter of a
  second by a thread of its own, and ended 10 s later if still there, so no worker keeps
  serving the port alone.

The workers share a folder the supervisor makes in the data directory, ``serve-*``, and
locks for its lifetime (:class:`Siblings`; one left by a supervisor killed with its workers
is unlocked, and removed at the next start): each worker writes its own Prometheus series and
its scheduler's role there every second, so ``/metrics`` sums the series of all workers and
``/healthz`` names worker 0's scheduler role whichever worker answers.

What stays per process: the rate limit (each worker counts its own, so N workers let N
times the burst through), the samplers' caches, the lock that makes asks of one study take
turns (across workers they race in the database, which hands each trial out once, as for
replicas), and the scheduler's wake-up: a study created or changed through worker 1..N-1 is
dispatched at the scheduler's next tick (``HPO_SCHEDULER_INTERVAL_S``, 1 s), not at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hpo.api.siblings import Siblings

if TYPE_CHECKING:  # imported late: a worker ignores Ctrl-C before its imports
    from hpo.service.settings import Settings

log = logging.getLogger("hpo.serve")

# How the supervisor tells a worker who it is (the HPO_ prefix keeps them out of Ray's and
# the ranks' environments, with the rest of the control plane's variables).
ENV_INDEX = "HPO_SERVE_WORKER"
ENV_FD = "HPO_SERVE_FD"
ENV_PARENT = "HPO_SERVE_PARENT"
ENV_FOLDER = "HPO_SERVE_FOLDER"
ENV_BEAT = "HPO_SERVE_BEAT"
# Exit status of a worker whose app did not start (its lifespan failed), and those of a
# worker that stopped as asked.
STARTUP_FAILED = 3
STOPPED = (0, -signal.SIGTERM, -signal.SIGINT)
# What a worker has to start (imports, the app's start-up), beyond HPO_WORKER_HANG_S, before
# its first beat.
START_S = 60.0
LOCK_FILE = "supervisor.lock"


def configure_logging(level: str, worker: int | None = None) -> None:
    """``hpo serve``'s log: lines at ``level`` and above, each naming its worker (given its
    index). Alembic's list of the plugins it sets up (seven lines at every start) is left
    out; its migrations are still logged."""
    who = "" if worker is None else f"[worker {worker}] "
    logging.basicConfig(
        level=level.upper(), format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def folder_for(data_dir: Path) -> tuple[Path, int]:
    """A new shared folder in ``data_dir`` and the descriptor of its lock, held for as long as
    it stays open. The folders whose lock nobody holds (their supervisor was killed with its
    workers) are removed first."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for old in data_dir.glob("serve-*"):
        try:
            fd = os.open(old / LOCK_FILE, os.O_RDWR)
        except OSError:
            continue  # being made or removed
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a running server's
        else:
            shutil.rmtree(old, ignore_errors=True)
        finally:
            os.close(fd)
    # made and locked under a name the reaping above does not match, then renamed
    new = Path(tempfile.mkdtemp(prefix=".new-serve-", dir=data_dir))
    try:
        lock = os.open(new / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            folder = data_dir / new.name.removeprefix(".new-")
            new.rename(folder)
        except BaseException:
            os.close(lock)
            raise
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return folder, lock


def supervise(
    settings: Settings,
    env: dict[str, str],
    workers: int,
    *,
    stop_timeout_s: float = 30.0,
) -> int:
    """Run ``workers`` worker processes on ``settings``' host and port until a signal stops
    them (0), or one of them exits by itself or its event loop does not beat for
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
    try:  # once, here: the workers do not (create_app, given their Siblings)
        upgrade_schema(engine)
    finally:
        engine.dispose()
    try:
        folder, lock = folder_for(settings.data_dir)
    except OSError as exc:
        log.error("cannot make the workers' folder in %s: %s", settings.data_dir, exc)
        return 1
    try:
        listeners = _listen(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)
        return 1
    # Set by SIGTERM/SIGINT. A plain list, not an Event: a handler that takes a lock the
    # interrupted main thread holds would wait for ever.
    stopping: list[int] = []
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda sig, _: stopping.append(sig)) for sig in signals}
    procs: list[subprocess.Popen] = []
    beats: list[int] = []  # the read ends of the workers' pipes
    fds = [sock.fileno() for sock in listeners]
    try:
        # what worker 0's scheduler is until it says (the others answer /healthz with it)
        Siblings(folder, 0).publish("", "standby" if settings.scheduler else "off")
        for index in range(workers):
            beat_r, beat_w = os.pipe()
            os.set_blocking(beat_r, False)
            beats.append(beat_r)
            child = {
                **env,
                ENV_INDEX: str(index),
                ENV_FD: ",".join(map(str, fds)),
                ENV_PARENT: str(os.getpid()),
                ENV_FOLDER: str(folder),
                ENV_BEAT: str(beat_w),
            }
            if index > 0:
                child["HPO_SCHEDULER"] = "false"  # one scheduler per server
            try:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "hpo.api.serving"],
                        env=child,
                        pass_fds=[*fds, beat_w],
                    )
                )
            finally:
                os.close(beat_w)
        for sock in listeners:
            sock.close()  # the workers hold them
        log.info("%d workers started (pids %s)", workers, ", ".join(str(p.pid) for p in procs))
        failed = _watch(procs, beats, settings.worker_hang_s, stopping)
        clean = _stop(procs, stop_timeout_s)
        return 1 if failed is not None or not clean else 0
    finally:
        _stop(procs, stop_timeout_s)  # a start that failed half-way
        for fd in beats:
            os.close(fd)
        for sock in listeners:
            sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)


def _watch(
    procs: list[subprocess.Popen], beats: list[int], hang_s: float, stopping: list[int]
) -> int | None:
    """Wait until a signal comes (None) or a worker exits or hangs (its index; a hung worker
    is killed, since SIGTERM does not reach a stopped process). A worker stopped by the
    signal that stops this process too (a group's SIGTERM, Ctrl-C) is not a failure."""
    heard = [time.monotonic() + START_S] * len(procs)  # before the first beat: START_S more
    last = time.monotonic()
    open_beats = dict(zip(beats, range(len(procs)), strict=True))  # read end -> worker
    while not stopping:
        ready, _, _ = select.select(list(open_beats), [], [], 0.2)
        now = time.monotonic()
        if now - last > 2.0:  # this process was paused (all of them were, with it)
            heard = [max(h, now) for h in heard]
        last = now
        for fd in ready:
            with contextlib.suppress(BlockingIOError):
                if os.read(fd, 4096):
                    heard[open_beats[fd]] = now
                else:  # closed: the worker is ending (poll says) or hangs (the limit says)
                    del open_beats[fd]
        for index, proc in enumerate(procs):
            if proc.poll() is None:
                continue
            time.sleep(0.5)  # the signal that stopped it may be on its way here too
            if stopping and proc.returncode in STOPPED:
                return None
            log.error(
                "worker %d (pid %d) exited with status %s; stopping the others",
                index,
                proc.pid,
                proc.returncode,
            )
            return index
        for index, proc in enumerate(procs):
            if now - heard[index] > hang_s:
                log.error(
                    "worker %d (pid %d) has not beaten in %.0f s (hung or stopped); "
                    "killing it and stopping the others",
                    index,
                    proc.pid,
                    hang_s,
                )
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)  # one in an uninterruptible wait may not die
                return index
    return None


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` names (``""``: every interface, IPv4 and
    IPv6), as asyncio's server binds them for ``hpo serve`` with one process."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:  # a family this kernel lacks (IPv6), as asyncio skips it
                if exc.errno != errno.EAFNOSUPPORT:
                    raise
                continue
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
    if not listeners:
        raise OSError(errno.EAFNOSUPPORT, f"no address family of {host!r} is supported here")
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
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
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
    beat_fd = int(os.environ.pop(ENV_BEAT))
    # The supervisor stops the workers on Ctrl-C (with SIGTERM); until uvicorn takes the
    # signals, a worker's imports would end in a KeyboardInterrupt's traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_parent(parent, folder)  # before the imports: a supervisor killed meanwhile is seen too
    os.set_blocking(beat_fd, False)
    os.set_inheritable(beat_fd, False)
    from hpo.service.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level, index)

    import uvicorn

    from hpo.api.app import create_app

    app = create_app(settings, freeze_heap=True, siblings=Siblings(folder, index, beat_fd=beat_fd))
    server = uvicorn.Server(uvicorn.Config(app, log_level=settings.log_level))
    # Once stopped, uvicorn raises again the signal that stopped it (and restores the
    # handlers it found): SIGTERM ends the process (status -15), SIGINT is ignored.
    sockets = [socket.socket(fileno=fd) for fd in fds]
    for sock in sockets:
        sock.set_inheritable(False)  # not into the processes this one starts (Ray's)
    server.run(sockets=sockets)
    return 0 if server.started else STARTUP_FAILED


if __name__ == "__main__":
    sys.exit(worker_main())
