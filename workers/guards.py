"""Guards of a training loop: :class:`LossGuard` fails a diverging trial, :class:`EarlyStopping`
stops one that no longer improves. Both have ``state_dict``/``load_state_dict``, so a resumed
attempt continues with the same reference loss and the same count of bad epochs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from hpo.workers.registry import TrainableError


class PeerDiverged(TrainableError):
    """Raised by a rank whose own losses are fine when another rank's diverged: an echo of
    that rank's error, which is the one to report."""


class LossGuard:
    """Fails the trial when the training loss is NaN/infinite, or exploding: above ``factor``
    times the first loss of the trial. Raises :class:`TrainableError` (never retried).

    The first loss is the reference for the whole trial: save the guard with the checkpoint
    (``ctx.report(..., checkpoint={"guard": guard, ...})``) so that a resumed attempt, whose
    well-trained model starts far below it, is not judged against its own first loss.

    On a GPU, :meth:`observe` each step's loss tensor and :meth:`settle` where the loop reads
    its losses anyway (every ``log_every`` steps, an epoch's end): ``loss.item()`` at every step
    makes the CPU wait for the GPU to finish the step before it can queue the next one.
    """

    def __init__(self, factor: float | None = 10.0) -> None:
        self.factor = factor
        self.first: float | None = None
        self._worst: torch.Tensor | None = None  # the highest loss observed since settle()
        self._since: int | None = None

    def check(self, step: int | str, loss: float) -> None:
        """Judge one loss now (``step``: where it was seen, for the message)."""
        where = step if isinstance(step, str) else f"step {step}"
        if not math.isfinite(loss):
            raise TrainableError(f"train_loss is {loss} at {where}: training diverged")
        if self.first is None:
            self.first = loss
        elif self.factor is not None and loss > self.factor * max(self.first, 1e-8):
            raise TrainableError(
                f"train_loss {loss:.4g} at {where} exceeds {self.factor:g} x the first loss "
                f"({self.first:.4g}): training diverged (exploding loss; lower the learning rate "
                "or clip gradients)"
            )

    def observe(self, step: int, loss: torch.Tensor) -> None:
        """Record a step's loss without waiting for it: judged at the next :meth:`settle`
        (the trial's first loss, the reference, is read at once, one wait). A non-finite loss
        is kept as NaN, which wins the running maximum: one anywhere in between is caught."""
        loss = loss.detach().float()
        if self.first is None and self._since is None:
            first = float(loss)
            if math.isfinite(first):
                self.first = first
        loss = torch.where(torch.isfinite(loss), loss, torch.nan)  # -inf too
        self._worst = loss if self._worst is None else torch.maximum(self._worst, loss)
        if self._since is None:
            self._since = step

    def settle(self, step: int) -> None:
        """Judge the losses observed since the last call (one wait for the device)."""
        if self._worst is None:
            return
        worst, since = float(self._worst), self._since
        self._worst = self._since = None
        self.check(step if since == step else f"steps {since}-{step}", worst)

    def settle_across(
        self, step: int, sums: list[float], all_reduce_sum: Callable[[list[float]], list[float]]
    ) -> list[float]:
        """:meth:`settle` on every DDP rank at once: ``sums`` summed over the ranks by
        ``all_reduce_sum`` (the trial context's), with each rank's verdict on its losses in
        the same collective. When one rank's losses diverged, every rank raises at this
        step, so that none is left waiting in the next collective for a rank that stopped."""
        try:
            self.settle(step)
            problem = None
        except TrainableError as exc:
            problem = str(exc)
        *totals, diverged = all_reduce_sum([*sums, 0.0 if problem is None else 1.0])
        if problem is not None:
            raise TrainableError(problem)
        if diverged:
            raise PeerDiverged(f"train_loss diverged on another rank by step {step}")
        return totals

    def state_dict(self) -> dict[str, float | None]:
        return {"first": self.first}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        first = state.get("first")
        self.first = None if first is None else float(first)


class EarlyStopping:
    """Stop once ``metric`` has not improved for ``patience`` epochs (never if None)."""

    def __init__(self, patience: int | None, mode: Literal["max", "min"] = "max") -> None:
        self.patience = patience
        self.sign = 1.0 if mode == "max" else -1.0
        self.best = -math.inf
        self.bad_epochs = 0

    def update(self, value: float) -> bool:
        """Record an epoch's value; returns whether to stop now."""
        if self.sign * value > self.best:
            self.best, self.bad_epochs = self.sign * value, 0
        else:
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "bad": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad"])


class GuardSettings(BaseModel):
    """The guard settings a trainable's settings model can inherit."""

    patience: int | None = Field(default=None, ge=1, description="Early stopping (epochs).")
    explode_factor: float | None = Field(default=10.0, gt=1)
