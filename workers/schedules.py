"""Learning-rate schedules stepped once per optimizer step, with a linear warm-up, on torch's own
schedulers: :class:`~torch.optim.lr_scheduler.LambdaLR` scales each parameter group's base rate
(layer-wise decay sets those) by the schedule's factor, and the ``plateau`` cuts are decided by
:class:`~torch.optim.lr_scheduler.ReduceLROnPlateau`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, Field
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

if TYPE_CHECKING:
    from hpo.workers.context import Resumed, TrialContext

ScheduleName = Literal["constant", "linear", "cosine", "step", "exponential", "plateau"]


class ScheduleSettings(BaseModel):
    """The schedule settings a trainable's settings model can inherit (see :meth:`Schedule.of`)."""

    scheduler: ScheduleName = "constant"
    warmup_frac: float = Field(default=0.0, ge=0, le=0.5)
    gamma: float = Field(default=0.5, gt=0, le=1, description="step/exponential/plateau.")
    step_epochs: int = Field(default=3, ge=1, description="step: decay every N epochs.")
    plateau_patience: int = Field(
        default=0, ge=0, description="plateau: epochs without a better val_loss before a cut."
    )


class Schedule:
    """A learning-rate schedule stepped once per optimizer step, with linear warm-up.

    Each parameter group keeps its own base rate and is scaled by: ``constant`` 1; ``linear``
    1 → 0; ``cosine`` ½(1 + cos πp); ``step`` ``gamma`` every ``step_epochs`` epochs;
    ``exponential`` ``gamma`` per epoch, smoothly; ``plateau`` times ``gamma`` whenever the
    validation loss has not improved for ``patience`` + 1 epochs (call :meth:`epoch_end`).
    ``p`` is the progress after warm-up, from 0 to 1.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kind: ScheduleName,
        *,
        total_steps: int,
        steps_per_epoch: int,
        warmup_fraction: float = 0.0,
        gamma: float = 0.5,
        step_epochs: int = 1,
        patience: int = 0,
    ) -> None:
        self.optimizer = optimizer
        self.kind = kind
        self.total = max(1, total_steps)
        self.per_epoch = max(1, steps_per_epoch)
        self.warmup = round(warmup_fraction * self.total)
        self.gamma = gamma
        self.step_epochs = step_epochs
        # ReduceLROnPlateau cuts the rate of a one-group stand-in optimizer: that rate is the
        # plateau scale, which the LambdaLR factor multiplies in (so warm-up still applies).
        self._scale = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        # (torch refuses a factor of 1; gamma 1 cuts nothing, so that plateau is never stepped)
        factor = gamma if gamma < 1 else 0.5
        self._plateau = ReduceLROnPlateau(self._scale, factor=factor, patience=patience)
        self._lambda = LambdaLR(optimizer, self.factor)

    @classmethod
    def of(
        cls, optimizer: torch.optim.Optimizer, s: ScheduleSettings, *, epochs: int, steps: int
    ) -> Schedule:
        """The schedule ``s`` describes, over ``epochs`` epochs of ``steps`` optimizer steps."""
        return cls(
            optimizer,
            s.scheduler,
            total_steps=epochs * steps,
            steps_per_epoch=steps,
            warmup_fraction=s.warmup_frac,
            gamma=s.gamma,
            step_epochs=s.step_epochs,
            patience=s.plateau_patience,
        )

    @property
    def scale(self) -> float:
        """The product of the plateau cuts so far (1.0 for the other kinds)."""
        return float(self._scale.param_groups[0]["lr"])

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far."""
        return self._lambda.last_epoch

    def factor(self, step: int) -> float:
        """The multiplier of every base rate at ``step``."""
        if step < self.warmup:  # a plateau cut made during warm-up holds at once
            ramp = (step + 1) / (self.warmup + 1)
            return ramp * self.scale if self.kind == "plateau" else ramp
        p = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        epochs = step / self.per_epoch
        if self.kind == "linear":
            return 1.0 - p
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if self.kind == "step":
            return self.gamma ** math.floor(epochs / self.step_epochs)
        if self.kind == "exponential":
            return self.gamma**epochs
        return self.scale  # constant (1.0) and plateau

    def step(self) -> None:
        self._lambda.step()

    def epoch_end(self, val_loss: float) -> None:
        """Let ``plateau`` judge the epoch's validation loss (the other kinds ignore it)."""
        if self.kind == "plateau" and self.gamma < 1:
            self._plateau.step(val_loss)
            self._apply()

    @property
    def lr(self) -> float:
        """The current rate of the last parameter group (the head's, with layer-wise decay)."""
        return float(self.optimizer.param_groups[-1]["lr"])

    def _apply(self) -> None:
        f = self.factor(self.steps)
        for group, base in zip(self.optimizer.param_groups, self._lambda.base_lrs, strict=True):
            group["lr"] = base * f

    def hyperparameters(self) -> list[dict[str, Any]]:
        """Each parameter group's settings (base rate, weight decay, momentum...), to hand
        back to :meth:`rebase` after loading another trial's checkpoint."""
        return [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def rebase(self, hyperparameters: list[dict[str, Any]]) -> None:
        """Keep the loaded progress (optimizer moments, schedule position) but go on with
        ``hyperparameters`` (from :meth:`hyperparameters` before the load): what a trial that
        copied another one's checkpoint (PBT) must do, or it would train on with the copied
        trial's rates."""
        groups = self.optimizer.param_groups
        for group, settings in zip(groups, hyperparameters, strict=True):
            group.update(settings)
        self._lambda.base_lrs = [float(g["initial_lr"]) for g in groups]
        self._apply()

    def resume(self, ctx: TrialContext, state: Mapping[str, Any]) -> Resumed | None:
        """``ctx.resume(**state)`` for a training loop this schedule drives (``state`` holds
        it): when the checkpoint was saved under other hyperparameters (a PBT copy, a
        replay's change), this trial's own are put back after the load (:meth:`rebase`)."""
        own = self.hyperparameters()
        resumed = ctx.resume(**state)
        if resumed is not None and resumed.retuned:
            self.rebase(own)
        return resumed

    def state_dict(self) -> dict[str, Any]:
        return {
            "lambda": self._lambda.state_dict(),
            "plateau": self._plateau.state_dict(),
            "scale": self.scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._lambda.load_state_dict(state["lambda"])
        self._plateau.load_state_dict(state["plateau"])
        self._scale.param_groups[0]["lr"] = float(state["scale"])
        self._apply()
