"""How the dispatcher ends an attempt whose rank failed (``runner._first_failure``), on plain
asyncio futures standing for the ranks' tasks: which failure it reports, and how long it lets
the other ranks end on their own before they are cancelled."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray.exceptions

from hpo.workers import TrainableError, runner
from hpo.workers.guards import PeerDiverged


async def _rank(delay: float, error: BaseException | None = None, value: object = None) -> object:
    await asyncio.sleep(delay)
    if error is not None:
        raise error
    return value


def _run(*ranks: tuple) -> tuple[BaseException | list, float, list[asyncio.Future]]:
    async def main() -> tuple[BaseException | list, float, list[asyncio.Future]]:
        futures = [asyncio.ensure_future(_rank(*r)) for r in ranks]
        start = time.monotonic()
        try:
            outcome: BaseException | list = await runner._first_failure(futures)
        except Exception as exc:
            outcome = exc
        took = time.monotonic() - start
        await asyncio.sleep(0)  # let the cancellations land
        return outcome, took, futures

    return asyncio.run(main())


def test_all_results_when_no_rank_fails() -> None:
    outcome, _, _ = _run((0.01, None, "a"), (0.02, None, "b"))
    assert outcome == ["a", "b"]


def test_a_dead_rank_is_reported_before_its_peers_errors() -> None:
    """Rank 0's process dies; rank 1 raises first (gloo lost its peer): the attempt failed
    because a process died, which a retry fixes without cost, not because rank 1 raised."""
    peer_lost = RuntimeError("Connection closed by peer")
    died = ray.exceptions.WorkerCrashedError()
    outcome, _, _ = _run((0.05, died), (0.01, peer_lost))
    assert outcome is died


def test_the_first_error_is_reported_when_no_process_died() -> None:
    first, second = ValueError("loss is inf"), RuntimeError("peer gone")
    outcome, took, _ = _run((0.01, first), (0.05, second))
    assert outcome is first and took < 1  # the other rank ended on its own: no waiting


def test_a_rank_that_diverged_is_reported_before_the_ranks_that_stopped_with_it() -> None:
    """Every rank raises at the step where one rank's loss diverged (``settle_across``): the
    attempt failed with that rank's error, not with another's echo of it, whichever ended
    first."""
    echo = ray.exceptions.RayTaskError(
        "rank", "tb", PeerDiverged("train_loss diverged on another rank by step 40")
    ).as_instanceof_cause()
    diverged = ray.exceptions.RayTaskError(
        "rank", "tb", TrainableError("train_loss is nan at steps 31-40: training diverged")
    ).as_instanceof_cause()
    outcome, _, _ = _run((0.01, echo), (0.05, diverged))
    assert outcome is diverged


def test_a_rank_that_does_not_end_is_cancelled_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "SIBLING_GRACE_S", 0.3)
    error = ValueError("boom")
    outcome, took, futures = _run((0.01, error), (60, None, "hung"))
    assert outcome is error and 0.3 <= took < 5
    assert futures[1].cancelled()
