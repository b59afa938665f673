"""The dashboard's analyses (parameter importance, contours) in a process of their own.

Reading every trial of a large study and fitting a forest to it is a few seconds of Python,
and the first fit after a start also imports scikit-learn (~2 s here). Run on the server's
threads, that time was taken from the requests around it: one interpreter runs one thread at a
time, so a dashboard opened on a study of 10,000 trials slowed its own trials and curves pages,
and every other client's reports, while its analyses ran (docs/benchmarks.md, "The analyses in
a process of their own").

:class:`AnalysisWorker` runs them in a child process (``python -m hpo.service.analysis_worker``)
that opens the database itself and keeps each study's trials between fits. The server only
sends (function, arguments) and gets the result back over a socket pair. The child:

- imports scikit-learn as it starts, and is started with the server when the database already
  holds a study large enough for its fits to matter (:meth:`AnalysisWorker.warm`), else at the
  first analysis;
- is started again when it died (killed, out of memory) and the job is sent once more;
- ends when the server closes it, and on its own when the server's end of the socket closes
  (the server was killed).

A database only the server's process can see (in-memory SQLite) is analysed on the server's
thread instead (:class:`InThread`), as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Hashable
from multiprocessing.connection import Connection
from typing import Any, Protocol, TypeVar

from cachetools import LRUCache
from sqlalchemy.engine import make_url

from hpo.service import analysis
from hpo.service.errors import AnalysisUnavailable
from hpo.service.spec import StudySpec
from hpo.service.storage import MAX_PAGE, Storage
from hpo.service.storage.trials import Outcome

log = logging.getLogger(__name__)
T = TypeVar("T")

# ------------------------------------------------------------------ the analyses


class _TrialMirror:
    """What the analyses read of every trial of one study (``Storage.outcomes``: no
    records), kept current through the ``since`` cursor."""

    def __init__(self) -> None:
        self.trials: dict[int, Outcome] = {}
        self.cursor: int | None = None
        self.lock = threading.Lock()

    def refresh(self, storage: Storage, study_id: int) -> list[Outcome]:
        with self.lock:
            while True:
                page, self.cursor = storage.outcomes(study_id, since=self.cursor)
                self.trials.update((t.id, t) for t in page)
                if len(page) < MAX_PAGE:
                    return list(self.trials.values())


class Workspace:
    """One database, and what the analyses keep of it between fits: each study's trials (the
    16 studies used last) and the last fits (a fit is done again only when the study's
    complete trials changed). Safe to share between threads."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._lock = threading.Lock()
        self._mirrors: LRUCache = LRUCache(16)
        self._fits: LRUCache = LRUCache(256)

    def study_trials(self, study_id: int) -> tuple[list[Outcome], tuple]:
        """Every trial of the study, and a key that changes whenever a complete trial does."""
        with self._lock:
            mirror = self._mirrors.get(study_id)
            if mirror is None:
                mirror = self._mirrors[study_id] = _TrialMirror()
        trials = mirror.refresh(self.storage, study_id)
        done = [t for t in trials if t.state == "complete"]
        return trials, (study_id, len(done), max((t.seq for t in done), default=0))

    def fitted(self, key: Hashable, fit: Callable[[], T]) -> T:
        """The fit kept under ``key``, else ``fit()`` (kept)."""
        with self._lock:
            if key in self._fits:
                return self._fits[key]
        value = fit()
        with self._lock:
            self._fits[key] = value
        return value


def fit_importance(
    ws: Workspace, study_id: int, spec: StudySpec, objective: int
) -> analysis.Importance:
    """Parameter importance over the study's complete trials as they are now."""
    trials, key = ws.study_trials(study_id)
    return ws.fitted(
        ("importance", *key, objective),
        lambda: analysis.param_importance(spec, trials, objective),
    )


def fit_contour(
    ws: Workspace, study_id: int, spec: StudySpec, x: str, y: str, objective: int, size: int
) -> dict[str, Any]:
    """The contour of ``x`` and ``y`` over the study's complete trials as they are now."""
    trials, key = ws.study_trials(study_id)
    return ws.fitted(
        ("contour", *key, x, y, objective, size),
        lambda: analysis.contour(spec, trials, x, y, objective, size=size),
    )


# --------------------------------------------------------------- where they run


class Analyses(Protocol):
    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(workspace, *args)`` where the analyses run: its result, or its exception."""
        ...

    def close(self) -> None: ...


class InThread:
    """On the calling thread, with the server's own storage."""

    def __init__(self, storage: Storage) -> None:
        self.workspace = Workspace(storage)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(self.workspace, *args)

    def close(self) -> None:
        pass


class AnalysisWorker:
    """One child process that runs the analyses, one job at a time (callers queue on a lock).
    Safe to share between threads."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._lock = threading.Lock()  # one job at a time on the one connection
        self._start_lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The worker's process id, while one is started."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def warm(self) -> None:
        """Start the worker now (it imports its libraries at once), not at the first job."""
        self._started()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            for attempt in (1, 2):
                conn = self._started()
                try:
                    conn.send((fn, args))
                    ok, value = conn.recv()
                except (EOFError, OSError):  # it died (killed, out of memory) or was closed
                    self._discard(conn)
                    if self._closed:
                        raise AnalysisUnavailable("the analysis worker was closed") from None
                    if attempt == 2:
                        why = "the analysis worker died twice during a job"
                        raise AnalysisUnavailable(why) from None
                    log.warning("the analysis worker died; starting another for the job")
                    continue
                if ok:
                    return value
                raise value
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Stop the worker (a job it runs is cut short: its caller gets AnalysisUnavailable)."""
        self._closed = True
        with self._start_lock:
            proc, self._proc = self._proc, None
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)

    def _started(self) -> Connection:
        with self._start_lock:
            if self._closed:
                raise AnalysisUnavailable("the analysis worker was closed")
            if self._conn is not None and self._proc is not None and self._proc.poll() is None:
                return self._conn
            ours, theirs = socket.socketpair()
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "hpo.service.analysis_worker", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                )
            finally:
                theirs.close()  # the child's end: ours reads EOF once the child is gone
            self._conn = Connection(ours.detach())
            # the URL (with its password) goes over the socket, not on the command line
            self._conn.send(self._url)
            return self._conn

    def _discard(self, conn: Connection) -> None:
        with self._start_lock:
            if self._conn is not conn:
                return
            proc, self._proc, self._conn = self._proc, None, None
        conn.close()
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)


def analyses_for(storage: Storage, database_url: str) -> Analyses:
    """A worker process for a database another process can open; else the server's thread."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return InThread(storage)
    return AnalysisWorker(database_url)


# ------------------------------------------------------------------ the child


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def serve(conn: Connection) -> None:
    """The worker's loop: run each job it is sent until the server's end closes."""
    from hpo.service.db import make_engine

    url = conn.recv()
    import sklearn.ensemble  # noqa: F401  (imported now, not by the first fit)

    ws = Workspace(Storage(make_engine(url)))
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return  # the server closed its end, or died
        try:
            answer: tuple[bool, Any] = (True, fn(ws, *args))
        except Exception as error:  # the caller raises it
            answer = (False, _picklable(error))
        try:
            conn.send(answer)
        except OSError:
            return


if __name__ == "__main__":
    # the module's own copy, not this __main__ one: jobs name its functions and caches
    from hpo.service.analysis_worker import serve as _serve

    with contextlib.suppress(KeyboardInterrupt):
        _serve(Connection(int(sys.argv[1])))
    os._exit(0)
