"""The loss guard and early stopping."""

from __future__ import annotations

import pytest

from hpo.workers import TrainableError, guards


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
