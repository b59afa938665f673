"""The loss guard and early stopping. The guard judges losses without waiting for the device
at every step, and the built-in training loops read their losses only where they log them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpo.api.demo import free_port
from hpo.workers import TrainableError, ddp, guards
from hpo.workers.guards import LossGuard
from tests.workers.test_trainables import run_local


def test_loss_guard_fails_on_nan_and_on_exploding_loss() -> None:
    guard = guards.LossGuard(factor=10)
    guard.check(1, 2.0)
    guard.check(2, 19.0)
    with pytest.raises(TrainableError, match=r"train_loss 25 at step 3 exceeds 10 x"):
        guard.check(3, 25.0)
    with pytest.raises(TrainableError, match="train_loss is nan at step 4: training diverged"):
        guards.LossGuard().check(4, float("nan"))
    with pytest.raises(TrainableError, match="train_loss is inf"):
        guards.LossGuard(None).check(1, float("inf"))
    guards.LossGuard(None).check(2, 1e30)  # no factor: only non-finite losses fail


def test_early_stopping_counts_epochs_without_improvement() -> None:
    stop = guards.EarlyStopping(patience=2)
    assert [stop.update(v) for v in (0.5, 0.6, 0.6, 0.55)] == [False, False, False, True]
    assert not any(guards.EarlyStopping(None).update(v) for v in (0.5, 0.4, 0.3))


def losses(guard: LossGuard, values: dict[int, float]) -> None:
    for step, value in values.items():
        guard.observe(step, torch.tensor(value))


def test_losses_are_judged_when_settled_against_the_first() -> None:
    guard = LossGuard()
    guard.observe(1, torch.tensor(float("inf")))  # judged with the rest, on every rank at once
    with pytest.raises(TrainableError, match="train_loss is nan at step 1: training diverged"):
        guard.settle(1)

    guard = LossGuard(factor=10.0)
    losses(guard, {1: 2.0, 2: 1.5, 3: float("nan"), 4: 1.0})  # nothing waits, nothing raises
    with pytest.raises(TrainableError, match="train_loss is nan at steps 1-4: training diverged"):
        guard.settle(4)

    guard = LossGuard(factor=10.0)
    losses(guard, {1: 2.0, 2: float("-inf"), 3: 1.0})  # not hidden by a larger finite loss
    with pytest.raises(TrainableError, match="train_loss is nan at steps 1-3: training diverged"):
        guard.settle(3)

    guard = LossGuard(factor=10.0)
    losses(guard, {1: 2.0, 2: 25.0, 3: 1.0})
    with pytest.raises(TrainableError, match=r"train_loss 25 at steps 1-3 exceeds 10 x the first"):
        guard.settle(3)


def test_a_settled_window_is_not_judged_again_and_the_reference_is_saved() -> None:
    guard = LossGuard(factor=10.0)
    guard.settle(0)  # nothing observed: nothing to judge
    losses(guard, {1: 2.0, 2: 19.0})
    guard.settle(2)
    losses(guard, {3: 1.0})
    guard.settle(3)  # the window of steps 2-3 was judged once, step 3 alone now
    assert guard.state_dict() == {"first": 2.0}
    resumed = LossGuard(factor=10.0)
    resumed.load_state_dict(guard.state_dict())
    losses(resumed, {4: 21.0})
    with pytest.raises(TrainableError, match="at step 4 exceeds 10 x the first loss"):
        resumed.settle(4)


def test_the_image_loop_reads_no_loss_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU each loss.item() makes the CPU wait until the step has run; the loop reads its
    # losses once an epoch. 1,437 training images in batches of 16: 90 steps an epoch.
    calls = []
    item, to_float = torch.Tensor.item, torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append(1) or item(t))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: calls.append(1) or to_float(t))
    _, reports, _ = run_local(
        "image-classification", {"epochs": 1, "batch_size": 16, "optimizer": "sgd"}, tmp_path
    )
    assert [step for step, _ in reports] == [1]
    assert len(calls) <= 10


def _diverging_rank(rank: int, port: int, folder: str) -> None:
    """Rank 1's loss turns NaN at step 2, rank 0's does not; both settle, then go on to the
    next collective (as the next epoch's gradients would)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    guard = LossGuard()
    losses(guard, {1: 2.0, 2: float("nan") if rank == 1 else 1.5})
    device = torch.device("cpu")
    try:
        guard.settle_across(2, [1.0, 2.0], lambda v: ddp.all_reduce_sum(v, device))
        ddp.all_reduce_sum([1.0], device)  # where a rank left behind would wait
        said = "went on"
    except TrainableError as exc:
        said = str(exc)
    (Path(folder) / f"rank-{rank}.txt").write_text(said)
    dist.destroy_process_group()


def test_a_rank_whose_loss_diverges_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    ranks = mp.spawn(_diverging_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 60
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:  # a rank waits in a collective for one that stopped
            for process in ranks.processes:
                process.kill()
            pytest.fail("a rank was left waiting in a collective")
    said = {rank: (tmp_path / f"rank-{rank}.txt").read_text() for rank in (0, 1)}
    assert said[1] == "train_loss is nan at steps 1-2: training diverged", said
    assert said[0] == "train_loss diverged on another rank by step 2", said
