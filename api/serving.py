"""``hpo serve --workers N``: N processes of the app on one listening socket.

One Python process is the queue when many trials stream metrics at once: every report's
validation, pruning and SQL run on one interpreter. With ``--workers N`` the command becomes a
supervisor. It does once what must happen once (the database check, the schema upgrade, the
API token), binds the port, and starts N worker processes that inherit the socket; the kernel
hands each new connection to one of them. Each worker is the whole app on the same database,
as N replicas would be (the tested multi-server set-up), and only worker 0 runs the scheduler.

What the supervisor guarantees:

- A worker that exits when nobody asked it to (killed, or its start-up failed) stops the
  others, and ``hpo serve`` exits with status 1 naming it: a process manager (systemd,
  Kubernetes) then restarts the whole server, never a server with a worker missing.
- SIGTERM or SIGINT stops the workers (each finishes its requests; killed after
  ``stop_timeout_s``) and ``hpo serve`` exits with 0 when all of them did.
- A worker whose supervisor is gone (``kill -9``) stops within a second by itself: it watches
  its parent, so no worker keeps serving the port alone.

The workers share a folder the supervisor makes and removes (:class:`Siblings`): each writes
its own Prometheus counters and its scheduler's role there every second, so ``/metrics``
sums the counters of all workers and ``/healthz`` names the scheduler's role whichever worker
answers.
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


def log_format(worker: int | None = None) -> str:
    """The format of ``hpo serve``'s log lines (a worker's name its index)."""
    who = "" if worker is None else f"[worker {worker}] "
    return f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"


class Siblings:
    """The folder that the workers of one ``hpo serve --workers N`` share.

    Worker ``index`` writes ``<index>.json`` there (its Prometheus text and its scheduler's
    role, replaced atomically); every worker reads all of them. A file is at most
    ``interval_s`` old (a worker publishes that often, and once more when it answers a scrape)."""

    def __init__(self, folder: Path, index: int, *, interval_s: float = 1.0) -> None:
        self.folder = folder
        self.index = index
        self.interval_s = interval_s

    def publish(self, metrics_text: str, scheduler: str) -> None:
        """Replace this worker's file (nothing once the folder is gone: the server stops)."""
        path = self.folder / f"{self.index}.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.write_text(json.dumps({"metrics": metrics_text, "scheduler": scheduler}))
            tmp.replace(path)

    def read(self) -> list[dict[str, Any]]:
        """Every worker's last file (fewer before all of them have published)."""
        found = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # removed at shutdown
                continue
        return found

    def scheduler_role(self) -> str:
        """The role of worker 0's scheduler (``running``, ``standby`` or ``off``: the server's
        scheduler is off); the supervisor writes what it starts as before worker 0 is up."""
        try:
            return str(json.loads((self.folder / "0.json").read_text())["scheduler"])
        except (OSError, ValueError, KeyError):  # being replaced
            return "standby"


def supervise(
    settings: Settings, env: dict[str, str], workers: int, *, stop_timeout_s: float = 30.0
) -> int:
    """Run ``workers`` worker processes on ``settings``' host and port until a signal stops
    them (0) or one of them exits by itself (1). ``env`` is their environment (the CLI's
    options as ``HPO_*`` variables among it). The caller has checked the database and made
    the API token."""
    from hpo.service.db import make_engine, upgrade_schema

    engine = make_engine(settings.resolved_database_url)
    try:  # once here, not raced by N workers
        upgrade_schema(engine)
    finally:
        engine.dispose()
    try:
        listener = _listen(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return 1
    folder = Path(tempfile.mkdtemp(prefix="hpo-serve-"))
    stopping = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in signals}
    procs: list[subprocess.Popen] = []
    try:
        # what worker 0's scheduler is until it says (the others answer /healthz with it)
        Siblings(folder, 0).publish("", "standby" if settings.scheduler else "off")
        for index in range(workers):
            child = {
                **env,
                ENV_INDEX: str(index),
                ENV_FD: str(listener.fileno()),
                ENV_PARENT: str(os.getpid()),
                ENV_FOLDER: str(folder),
            }
            if index > 0:
                child["HPO_SCHEDULER"] = "false"  # one scheduler per server
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "hpo.api.serving"],
                    env=child,
                    pass_fds=[listener.fileno()],
                )
            )
        listener.close()  # the workers hold it
        log.info("%d workers started (pids %s)", workers, ", ".join(str(p.pid) for p in procs))
        failed: tuple[int, int] | None = None
        while failed is None and not stopping.wait(0.2):
            failed = next(
                ((i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None), None
            )
        if failed is not None:
            index, status = failed
            log.error(
                "worker %d (pid %d) exited with status %s; stopping the others",
                index,
                procs[index].pid,
                status,
            )
        clean = _stop(procs, stop_timeout_s)
        return 1 if failed is not None or not clean else 0
    finally:
        _stop(procs, stop_timeout_s)  # a start that failed half-way
        listener.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=2048)
    listener.set_inheritable(True)
    return listener


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
    fd = int(os.environ.pop(ENV_FD))
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
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[socket.socket(fileno=fd)])
    return 0 if server.started else STARTUP_FAILED


if __name__ == "__main__":
    sys.exit(worker_main())
