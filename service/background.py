"""Slow work off the request thread: a caller waits a bounded time for a result, and past
that comes back later while the work goes on; the finished result waits for the next caller.

Used for GP suggestions (:mod:`hpo.service.asking`: an ask whose fit outlasts
``HPO_ASK_WAIT_S`` answers 503 with Retry-After, and the retried ask takes the suggestion) and
for the dashboard's parameter importance and contours (:mod:`hpo.api.routes.dashboard`; the
fits themselves run in :mod:`hpo.service.analysis_worker`'s process).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any


class NotReady(Exception):
    """The job of a key was still running when the caller's wait ran out."""


class BackgroundJobs:
    """Jobs by key on ``workers`` daemon threads: at most one job per key at a time, and the
    ``keep`` most recently used jobs (finished or not) remembered. Safe to share between
    threads."""

    def __init__(self, workers: int = 2, keep: int = 256, name: str = "hpo-background") -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._jobs: OrderedDict[Hashable, Future] = OrderedDict()
        self.keep = keep

    def start(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> Future:
        """The job of ``key``: the one running or finished, else ``fn(*args)`` started now."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                job = self._jobs[key] = self._pool.submit(fn, *args)
                while len(self._jobs) > self.keep:
                    self._jobs.popitem(last=False)
            self._jobs.move_to_end(key)
            return job

    def result(
        self, key: Hashable, fn: Callable[..., Any], *args: Any, wait_s: float | None
    ) -> Any:
        """The result of the job of ``key`` (started with ``fn(*args)`` if there is none),
        waiting at most ``wait_s`` seconds (None: as long as it takes). The job stays kept
        for later callers. Raises NotReady when the wait ran out, or what the job raised
        (the failed job is then forgotten, so the next caller starts it again)."""
        job = self.start(key, fn, *args)
        try:
            return job.result(timeout=wait_s)
        except FutureTimeout:
            raise NotReady(key) from None
        except Exception:
            self.forget(key, job)
            raise

    def take(self, key: Hashable, fn: Callable[..., Any], *args: Any, wait_s: float | None) -> Any:
        """Like :meth:`result`, but a finished result is handed out once: the job is
        forgotten as it is returned (a caller that waited on it at the same time may get the
        same result too)."""
        job = self.start(key, fn, *args)
        value = self.result(key, fn, *args, wait_s=wait_s)
        self.forget(key, job)
        return value

    def ready(self, key: Hashable) -> bool:
        """Whether the job of ``key`` has finished (and is still kept)."""
        with self._lock:
            job = self._jobs.get(key)
        return job is not None and job.done()

    def forget(self, key: Hashable, job: Future | None = None) -> None:
        """Forget the job of ``key`` (only if it is still ``job``, when given)."""
        with self._lock:
            if job is None or self._jobs.get(key) is job:
                self._jobs.pop(key, None)

    def forget_where(self, match: Callable[[Hashable], bool]) -> None:
        """Forget every job whose key matches."""
        with self._lock:
            for key in [k for k in self._jobs if match(k)]:
                del self._jobs[key]
