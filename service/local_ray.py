"""The processes of a local Ray instance that ``hpo serve`` starts: what they inherit, and their
clean-up after a crash.

A local Ray's raylet, GCS and agents are children of the server process and inherit its
environment; every rank process is started by them. :func:`scrubbed_environ` removes the
control plane's secrets (the admin token, the database URL: see
:func:`hpo.service.executor.control_plane_secrets`) from the environment while Ray starts.

When the server is killed (kill -9, OOM), some of Ray's agents live on. :func:`record` writes
the session's processes (pid and start time) to a file in the server's data directory;
:func:`reap_leftovers`, run before the next local start, ends those that still run if the
server that recorded them is gone. A cluster's processes (``HPO_RAY_ADDRESS``) are never
recorded, so never touched, and ``ray stop`` is never run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import psutil

from hpo.service.executor import control_plane_secrets

log = logging.getLogger("hpo.executor")


@contextlib.contextmanager
def scrubbed_environ() -> Iterator[list[str]]:
    """Remove the control plane's secrets from ``os.environ`` for the block (processes started
    in it do not inherit them) and put them back after; yields the names removed."""
    removed = {name: os.environ.pop(name) for name in control_plane_secrets(os.environ)}
    try:
        yield sorted(removed)
    finally:
        os.environ.update(removed)


# The control plane's own processes among its descendants (its analysis worker): not Ray's, so
# neither recorded as the local Ray session nor reaped with it.
_NOT_RAY: set[int] = set()


def not_ray(pid: int, *, forget: bool = False) -> None:
    """Count process ``pid`` out of :func:`descendants` (``forget``: it has ended)."""
    if forget:
        _NOT_RAY.discard(pid)
    else:
        _NOT_RAY.add(pid)


def descendants() -> list[psutil.Process]:
    """This process's descendants but the control plane's own (the local Ray session)."""
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in _NOT_RAY]


def record(path: Path) -> int:
    """Write this process and its descendants (the local Ray session) to ``path``; returns how
    many descendants were recorded."""
    me = psutil.Process()
    procs = []
    for child in descendants():
        with contextlib.suppress(psutil.Error):
            procs.append({"pid": child.pid, "started": child.create_time()})
    body = {"owner": {"pid": me.pid, "started": me.create_time()}, "processes": procs}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(path)
    return len(procs)


def reap_leftovers(path: Path, grace_s: float = 5.0) -> int:
    """End the processes recorded in ``path`` by a server that no longer runs, and remove the
    file; returns how many were ended. A live owner's session is left alone."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    if _alive(body.get("owner") or {}):
        return 0
    left = [p for p in (_process(entry) for entry in body.get("processes", [])) if p is not None]
    reap(left, grace_s)
    path.unlink(missing_ok=True)
    if left:
        log.warning("ended %d process(es) left by a previous local Ray session", len(left))
    return len(left)


def _alive(entry: dict) -> bool:
    return _process(entry) is not None


def _process(entry: dict) -> psutil.Process | None:
    """The process ``entry`` recorded (same pid *and* start time), if it still runs."""
    try:
        proc = psutil.Process(int(entry["pid"]))
        if abs(proc.create_time() - float(entry["started"])) > 0.01:
            return None  # the pid was reused by an unrelated process
        return proc if proc.status() != psutil.STATUS_ZOMBIE else None
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None


def reap(procs: list[psutil.Process], grace_s: float = 5.0) -> None:
    """Terminate the processes still alive; kill those left after ``grace_s``."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
