"""The thread pools of the hot routes: a few threads each, so that requests do not queue on the GIL.

A sync route runs in a worker thread, and FastAPI's default pool has 40. When 200 dashboards
polled (about 120 requests a second) the server used under half a core, yet a study poll that
needs 1.5 ms of work ran for 12-24 ms p50 in its thread and waited 20 ms or more for one: with
dozens of threads runnable at once, each of a request's database calls gives up the GIL and
waits its turn to take it back. Running the polled routes (study, trials page, curves) in a
pool of their own of 4 threads (a FIFO queue in front of them) made the server's time per poll
1.5-1.8x shorter in A/B pairs (docs/benchmarks.md, "Dashboard polling"), and no burst of other
requests (reports waiting for SQLite's write lock, an ask waiting for a model fit) can take
the polls' threads. The price: a poll waits behind every poll queued ahead of it, slow ones too
(a first load's page of 1,000 trials takes ~80 ms). The dashboard's list of studies and its
analyses stay in the default pool (the analyses may wait two seconds for a fit).

Metric reports run in a pool of 8 (:data:`REPORTS`). In FastAPI's pool, 64 trials reporting
as fast as they were answered kept up to 40 threads busy with reports at once, and the asks
that replace pruned trials starved behind them: 26-35 asks in a 20-s run waited their turn
for over 10 s (answered 503) on either database. With 8, none did on SQLite (7-13 on
PostgreSQL), and SQLite stored 18-44 % more points (docs/benchmarks.md, "Scale: metrics").
Heartbeats stay in FastAPI's pool (:data:`DEFAULT`): they never wait for a report's thread
(their write still takes its turn with the reports'). Eight reports stuck on a study's row
would hold every report thread: on PostgreSQL a report's lock wait ends after
``hpo.service.reporting.REPORT_LOCK_TIMEOUT_S`` (503), as SQLite's busy timeout does. Each
route is one trip to a thread (see :func:`runs_in`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from anyio.lowlevel import RunVar
from fastapi import Request

from hpo.service.errors import SuggestionPending

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Pool:
    """At most ``threads`` calls of the routes put in this pool run at once (one limiter per
    event loop)."""

    name: str
    threads: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "_limiter", RunVar[CapacityLimiter](f"hpo_pool_{self.name}"))

    def limiter(self) -> CapacityLimiter:
        var: RunVar[CapacityLimiter] = self._limiter  # type: ignore[attr-defined]
        try:
            return var.get()
        except LookupError:
            limiter = CapacityLimiter(self.threads)
            var.set(limiter)
            return limiter


# Polls of a study, its trials and its curves: short reads (an answer by ETag, or one page).
POLLS = Pool("polls", 4)
# Asks: a server's asks of one study take turns, waiting for their turn on the event loop
# (:func:`study_turn`), so a thread of this pool runs only an ask that holds its study's turn:
# a burst of asks holds no thread of the pools that reports and heartbeats need, and one
# study's slow fits hold one thread, not the pool.
ASKS = Pool("asks", 4)
# Metric reports: at most 8 at once, so that a burst of them leaves the interpreter to the
# asks, heartbeats and polls between them (see the module's notes).
REPORTS = Pool("reports", 8)
# FastAPI's own pool (anyio's default limiter, 40 threads).
DEFAULT: Pool | None = None


def runs_in(pool: Pool | None) -> Callable[[Callable[P, R]], Callable[P, Awaitable[R]]]:
    """Run a sync route in ``pool`` (:data:`DEFAULT`: FastAPI's). The route keeps its
    signature (FastAPI reads it through ``__wrapped__``), and as a coroutine FastAPI checks
    its answer on the event loop: one trip to a thread, where a plain ``def`` route makes a
    second one to have its answer validated."""

    def wrap(route: Callable[P, R]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(route)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            call = functools.partial(route, *args, **kwargs)
            limiter = pool.limiter() if pool is not None else None
            return await anyio.to_thread.run_sync(call, limiter=limiter)

        return run

    return wrap


@contextlib.asynccontextmanager
async def study_turn(request: Request, study_id: int, wait_s: float | None) -> AsyncIterator[None]:
    """Hold study ``study_id``'s turn to ask on this server (one ask at a time, in arrival
    order), waiting for it at most ``wait_s`` (None: as long as it takes), then
    SuggestionPending (HTTP 503, retry). The scheduler's asks take turns with these inside
    ``StudyService.ask``."""
    turns = getattr(request.app.state, "ask_turns", None)
    if turns is None:  # study id -> its turn, kept while someone holds or waits for it
        turns = request.app.state.ask_turns = weakref.WeakValueDictionary()
    turn = turns.get(study_id)
    if turn is None:
        turn = turns[study_id] = asyncio.Lock()
    try:
        await asyncio.wait_for(turn.acquire(), wait_s)
    except (TimeoutError, asyncio.TimeoutError):  # one and the same from Python 3.11
        raise SuggestionPending(
            f"study {study_id}: its other asks held this one for {wait_s:g} s; ask again",
            retry_after_s=1,
        ) from None
    try:
        yield
    finally:
        turn.release()
