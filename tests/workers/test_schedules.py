"""LR schedules on torch's schedulers: their shapes, warm-up, plateau cuts, layer groups, resume."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hpo.workers import schedules


def _opt(*lrs: float) -> torch.optim.Optimizer:
    """A real optimizer with one parameter group per rate (layer-wise decay makes several)."""
    return torch.optim.SGD(
        [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs]
    )


def _trace(kind: str, **kw: object) -> list[float]:
    opt = _opt(1.0)
    s = schedules.Schedule(opt, kind, total_steps=20, steps_per_epoch=5, **kw)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(19):
        opt.step()  # as in training: the optimizer steps, then the schedule
        s.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_schedules_have_their_shapes() -> None:
    assert _trace("constant") == [1.0] * 20
    linear = _trace("linear", warmup_fraction=0.2)
    assert linear[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # warm-up: 4 steps
    assert linear[4] == 1.0 and linear[-1] == pytest.approx(1 / 16)
    assert all(a >= b for a, b in itertools.pairwise(linear[4:]))
    cosine = _trace("cosine")
    assert cosine[0] == 1.0 and cosine[10] == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    step = _trace("step", gamma=0.1, step_epochs=2)
    assert step[9] == 1.0 and step[10] == pytest.approx(0.1) and step[19] == pytest.approx(0.1)
    expo = _trace("exponential", gamma=0.5)
    assert expo[5] == pytest.approx(0.5) and expo[10] == pytest.approx(0.25)


def test_a_gamma_of_one_is_no_decay_for_every_kind() -> None:
    """``gamma: 1`` (allowed: no decay) made torch's plateau refuse its factor, and every
    trial of a study searching gamma up to 1 failed before its first step."""
    for kind in ("constant", "step", "exponential", "plateau"):
        assert _trace(kind, gamma=1.0) == [1.0] * 20, kind
    opt = _opt(1.0)
    s = schedules.Schedule(opt, "plateau", total_steps=10, steps_per_epoch=5, gamma=1.0)
    for loss in (1.0, 2.0, 3.0):  # never better: still no cut
        s.epoch_end(loss)
    assert opt.param_groups[0]["lr"] == 1.0


def test_plateau_schedule_and_layer_groups_and_resume() -> None:
    opt = _opt(1.0, 0.5)  # two groups (layer-wise decay): both scaled, ratio kept
    s = schedules.Schedule(opt, "plateau", total_steps=10, steps_per_epoch=5, gamma=0.1)
    s.epoch_end(1.0)
    s.epoch_end(0.9)
    assert opt.param_groups[1]["lr"] == 0.5
    s.epoch_end(0.95)  # no improvement: reduce
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.05])
    again = _opt(1.0, 0.5)
    resumed = schedules.Schedule(again, "plateau", total_steps=10, steps_per_epoch=5, gamma=0.1)
    resumed.load_state_dict(s.state_dict())
    assert [g["lr"] for g in again.param_groups] == pytest.approx([0.1, 0.05])


def test_a_plateau_cut_during_warm_up_holds_at_once() -> None:
    """The warm-up ramp left out the plateau's cuts: a loss that rose every epoch of a
    half-long warm-up cut the scale to 1e-4 while the rate kept climbing to 0.95, then it
    fell 9,500-fold in one step when the warm-up ended."""
    opt = _opt(1.0)
    s = schedules.Schedule(
        opt,
        "plateau",
        total_steps=40,
        steps_per_epoch=4,
        warmup_fraction=0.5,
        gamma=0.1,
        patience=0,
    )
    used = []
    for epoch in range(8):
        for _ in range(4):
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            s.step()
        s.epoch_end(float(epoch))  # worse every epoch: a cut after each from the second
    assert used[:8] == pytest.approx([(i + 1) / 21 for i in range(8)])  # no cut yet
    assert used[8] == pytest.approx(9 / 21 * 0.1)  # the cut after epoch 2 applies at once
    assert used[12] == pytest.approx(13 / 21 * 0.01)
    assert all(b <= a for a, b in itertools.pairwise(used[4::4]))  # never back up


def test_a_copied_checkpoint_keeps_its_progress_and_takes_this_trials_rates() -> None:
    """PBT: trial B loads trial A's optimizer and schedule after 6 of 20 cosine steps; with
    ``rebase`` it goes on from step 6 with its own base rates and weight decay."""
    donor_opt = torch.optim.SGD(
        [{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1}], weight_decay=0.01
    )
    donor = schedules.Schedule(donor_opt, "cosine", total_steps=20, steps_per_epoch=5)
    for _ in range(6):
        donor_opt.step()
        donor.step()
    mine = torch.optim.SGD(
        [{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.5}], weight_decay=0.2
    )
    schedule = schedules.Schedule(mine, "cosine", total_steps=20, steps_per_epoch=5)
    own = schedule.hyperparameters()
    mine.load_state_dict(donor_opt.state_dict())
    schedule.load_state_dict(donor.state_dict())
    assert mine.param_groups[0]["weight_decay"] == 0.01  # the copy's, until rebased
    schedule.rebase(own)
    assert schedule.steps == 6
    assert mine.param_groups[0]["lr"] == pytest.approx(0.5 * schedule.factor(6))
    assert mine.param_groups[0]["weight_decay"] == 0.2
    mine.step()
    schedule.step()
    assert mine.param_groups[0]["lr"] == pytest.approx(0.5 * schedule.factor(7))
