"""The dashboard's analyses (parameter importance, contours) in a process of their own.

Reading every trial of a large study and fitting a forest to it is a few seconds of Python,
and the first fit after a start also imports scikit-learn (~2 s here). Run on the server's
threads, that time was taken from the requests around it: one interpreter runs one thread at a
time, so a dashboard opened on a study of 10,000 trials slowed its own trials and curves pages,
and every other client's reports, while its analyses ran (docs/benchmarks.md, "The analyses in
a process of their own").

:class:`AnalysisWorker` runs them in a child process (``hpo.service.analysis_worker.main``)
that opens the database itself and keeps each study's trials between fits. The server only
sends (function, arguments) and gets the result back over a socket pair. The child:

- imports scikit-learn as it starts, and is started with the server when the database already
  holds a study large enough for its fits to matter (:meth:`AnalysisWorker.warm`), else at the
  first analysis;
- is started again when it died (killed, out of memory) and the job is sent once more, and
  is stopped when a job outlasts ``job_timeout_s``;
- ends when the server closes it, and on its own when the server's end of the socket closes
  (the server was killed).

A database only the server's process can see (in-memory SQLite) is analysed on the server's
thread instead (:class:`InThread`), as before.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Hashable
from multiprocessing.connection import Connection
from typing import Any, Protocol, TypeVar

from cachetools import LRUCache

from hpo.service import analysis, local_ray
from hpo.service.db.engine import in_memory
from hpo.service.errors import AnalysisUnavailable, HpoError
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
    complete trials or its spec changed). Safe to share between threads."""

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


def _spec_key(spec: StudySpec) -> str:
    """What of the spec a fit depends on (its space and objective), as a key: a spec edited
    since (a parameter added by define-by-run) is fitted again."""
    return spec.model_dump_json(include={"space", "objective"})


def fit_importance(
    ws: Workspace, study_id: int, spec: StudySpec, objective: int
) -> analysis.Importance:
    """Parameter importance over the study's complete trials as they are now."""
    trials, key = ws.study_trials(study_id)
    return ws.fitted(
        ("importance", *key, _spec_key(spec), objective),
        lambda: analysis.param_importance(spec, trials, objective),
    )


def fit_contour(
    ws: Workspace, study_id: int, spec: StudySpec, x: str, y: str, objective: int, size: int
) -> dict[str, Any]:
    """The contour of ``x`` and ``y`` over the study's complete trials as they are now."""
    trials, key = ws.study_trials(study_id)
    return ws.fitted(
        ("contour", *key, _spec_key(spec), x, y, objective, size),
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


# The worker's command. ``-c`` (like ``-m``) puts the working directory first on the child's
# path ("", unless PYTHONSAFEPATH); it is taken off before anything is imported, so a
# ``sklearn/`` there is not imported instead of scikit-learn.
_BOOT = (
    "import sys\n"
    "if sys.path and sys.path[0] == '': del sys.path[0]\n"
    "from hpo.service import analysis_worker as w; w.main()"
)


class AnalysisWorker:
    """One child process that runs the analyses, one job at a time (callers queue on a lock).
    Safe to share between threads.

    A worker that dies during a job is started again and the job sent once more. A job that
    kills it twice, a worker that cannot start, or a job past ``job_timeout_s`` (the worker is
    then killed) raises AnalysisUnavailable, and no worker is started for ``cooldown_s``
    after it. Its environment is the server's as it was when this was made (Ray's
    start-up takes the database's secrets out of the process's environment for a while)."""

    def __init__(
        self, database_url: str, *, job_timeout_s: float = 120.0, cooldown_s: float = 30.0
    ) -> None:
        self._url = database_url
        self._env = dict(os.environ)
        self.job_timeout_s = job_timeout_s
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()  # one job at a time on the one connection
        self._start_lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._closed = False
        self._down_until = 0.0  # no worker is started before (monotonic)

    @property
    def pid(self) -> int | None:
        """The worker's process id, while one is started."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def warm(self) -> None:
        """Start the worker now (it imports its libraries at once), not at the first job. A
        worker that cannot be started now is only logged: the first job tries again."""
        try:
            self._started()
        except (OSError, AnalysisUnavailable) as error:
            log.warning("the analysis worker did not start: %s", error)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            for attempt in (1, 2):
                conn = None
                try:
                    conn = self._started()
                    conn.send((fn, args))
                    if not conn.poll(self.job_timeout_s):
                        self._discard(conn)
                        took = f"{self.job_timeout_s:g} s"
                        raise self._cool_down(f"an analysis outlasted {took}: stopped")
                    ok, value = conn.recv()
                except (EOFError, OSError) as error:  # it died (killed, out of memory)
                    code = self._discard(conn) if conn is not None else None
                    if self._closed:
                        raise AnalysisUnavailable("the analysis worker was stopped") from None
                    if conn is None:
                        why = f"the analysis worker did not start: {error}"
                        raise self._cool_down(why) from None
                    if attempt == 2:
                        why = f"the analysis worker failed twice in a row (exit code {code})"
                        raise self._cool_down(why) from None
                    log.warning("the analysis worker died (exit %s); another runs the job", code)
                    continue
                if ok:
                    return value
                raise value
        raise AssertionError("unreachable")

    def _cool_down(self, why: str) -> AnalysisUnavailable:
        """No worker is started for ``cooldown_s`` (a page polls every few seconds: a job that
        always fails would start one each time): the error to raise."""
        self._down_until = time.monotonic() + self.cooldown_s
        return AnalysisUnavailable(why, retry_after_s=max(1, math.ceil(self.cooldown_s)))

    def close(self) -> None:
        """Stop the worker (a job it runs is cut short: its caller gets AnalysisUnavailable)."""
        self._closed = True
        with self._start_lock:
            proc, self._proc = self._proc, None
            conn, self._conn = self._conn, None
        if proc is not None:
            _end(proc)
        # a caller reading the connection reads EOF now and lets go of the lock
        if conn is not None and self._lock.acquire(timeout=10):
            conn.close()
            self._lock.release()

    def _started(self) -> Connection:
        with self._start_lock:
            if self._closed:
                raise AnalysisUnavailable("the analysis worker was stopped")
            if self._conn is not None and self._proc is not None and self._proc.poll() is None:
                return self._conn
            left = self._down_until - time.monotonic()
            if left > 0:
                why = "the analysis worker failed; trying again shortly"
                raise AnalysisUnavailable(why, retry_after_s=max(1, math.ceil(left)))
            if self._proc is not None:  # it ended between jobs
                local_ray.not_ray(self._proc.pid, forget=True)
                self._proc.wait()
            if self._conn is not None:
                self._conn.close()
            self._proc = self._conn = None
            ours, theirs = socket.socketpair()
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", _BOOT, str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    env=self._env,
                )
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()  # the child's end: ours reads EOF once the child is gone
            local_ray.not_ray(self._proc.pid)
            self._conn = conn = Connection(ours.detach())
            try:  # the URL (with its password) goes over the socket, not on the command line
                conn.send(self._url)
            except OSError:
                proc, self._proc, self._conn = self._proc, None, None
                conn.close()
                _end(proc)
                raise
            return conn

    def _discard(self, conn: Connection) -> int | None:
        """Kill the worker behind ``conn`` (if it is still the current one); its exit code."""
        with self._start_lock:
            if self._conn is not conn:
                return None
            proc, self._proc, self._conn = self._proc, None, None
        conn.close()
        return _end(proc) if proc is not None else None


def _end(proc: subprocess.Popen) -> int | None:
    proc.kill()
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return None
    finally:
        local_ray.not_ray(proc.pid, forget=True)


def analyses_for(storage: Storage, database_url: str) -> Analyses:
    """A worker process for a database another process can open; else the server's thread."""
    if in_memory(database_url):
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

    engine = make_engine(url, pool_size=1)  # one job at a time: one connection
    ws = Workspace(Storage(engine))
    try:
        while True:
            try:
                job = conn.recv_bytes()
            except (EOFError, OSError):
                return  # the server closed its end, or died
            try:
                fn, args = pickle.loads(job)
                answer = pickle.dumps((True, fn(ws, *args)))
            except Exception as error:  # the caller raises it
                if not isinstance(error, HpoError):  # a bug: its traceback goes to the log
                    traceback.print_exc()
                answer = pickle.dumps((False, _picklable(error)))
            try:
                conn.send_bytes(answer)
            except OSError:
                return
    finally:
        engine.dispose()


def main() -> None:
    """``python -c ... <fd>``: serve the server's socket end ``fd``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its life follows the socket, not Ctrl-C
    serve(Connection(int(sys.argv[1])))
    os._exit(0)
