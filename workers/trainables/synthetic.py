"""``synthetic``: a dataless DDP trainable for smoke tests, demos of pruning, and fault drills.

Its "loss" falls as ``(x - 0.3)**2 + 1/step``; the ranks all-reduce at every step, so it
exercises the same process group, reporting, checkpoint, resume and early-stop paths as real
training.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from hpo.service.executor import control_plane_secrets
from hpo.workers import checkpoints, trainable
from hpo.workers.context import TrialContext


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    x: float = 0.0
    lr: float | None = Field(
        default=None,
        gt=0,
        description="Train a weight w (from 1.0) by gradient steps of this size on "
        "(w - 0.3)**2, which the loss then adds: a state worth copying (PBT).",
    )
    steps: int = Field(default=10, ge=1)
    step_s: float = Field(default=0.0, ge=0, description="Sleep per step (simulated work).")
    fail_at_step: int | None = Field(
        default=None, description="Kill rank 0 at this step (steps + 1: after the last one)..."
    )
    fail_after_steps: int | None = Field(
        default=None,
        ge=0,
        description="Kill rank 0 after this many steps of the attempt (0: before its first; "
        "a resumed attempt starts where its checkpoint left off)...",
    )
    fail_on_attempts: list[int] = Field(default=[1], description="...on these attempts only.")
    hang_at_step: int | None = Field(default=None, description="Freeze rank 0 (SIGSTOP).")
    raise_at_step: int | None = Field(default=None, description="Raise an error at this step.")
    stall_at_step: int | None = Field(
        default=None,
        description="Rank 0 sleeps at this step while its reporter keeps heartbeating: a hung "
        "trial that still looks alive (only progress_timeout_s catches it).",
    )
    report_secrets: bool = Field(
        default=False,
        description="Report `secrets_seen`: how many control-plane secrets (admin token, "
        "database URL, other HPO_* settings) the rank's environment holds (should be 0).",
    )


def evaluate(checkpoint: Path, settings: Settings, device: torch.device) -> dict[str, float]:
    """A "test" metric read back from the checkpoint (exercises the evaluation path)."""
    state, meta = checkpoints.load(checkpoint, device)
    return {"test_loss": float(state["loss"]), "test_step": float(meta["step"])}


@trainable(Settings, evaluate=evaluate)
def train(ctx: TrialContext) -> dict[str, float]:
    s: Settings = ctx.settings
    resumed = ctx.resume()
    start, loss, w = 1, float("nan"), 1.0
    if resumed is not None:
        start, loss = resumed.next_step, float(resumed.values["loss"])
        w = float(resumed.values.get("w", w))
        ctx.extra["resumed_from_step"] = resumed.step
    after = None if s.fail_after_steps is None else start + s.fail_after_steps
    for step in range(start, s.steps + 1):
        time.sleep(s.step_s)
        if ctx.is_main and step in (s.fail_at_step, after) and ctx.attempt in s.fail_on_attempts:
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dying mid-trial
        if ctx.is_main and step == s.hang_at_step:
            os.kill(os.getpid(), signal.SIGSTOP)  # a worker that hangs: no more heartbeats
        if ctx.is_main and step == s.stall_at_step:
            time.sleep(24 * 3600)  # stuck in Python: the reporter thread still heartbeats
        if step == s.raise_at_step:
            raise ValueError(f"synthetic failure at step {step}")
        gap = s.x - 0.3
        local = gap * gap + 1.0 / step + 0.001 * ctx.rank  # a huge x overflows to inf
        if s.lr is not None:
            w -= s.lr * 2 * (w - 0.3)
            local = gap * gap + (w - 0.3) ** 2 + 0.001 * ctx.rank
        total, count = ctx.all_reduce_sum([local, 1.0])
        loss = total / count
        metrics = {"loss": loss}
        if s.report_secrets:
            metrics["secrets_seen"] = float(len(control_plane_secrets(os.environ)))
        if ctx.report(step, metrics, checkpoint={"loss": loss, "w": w}):
            break
    if ctx.is_main and s.fail_at_step == s.steps + 1 and ctx.attempt in s.fail_on_attempts:
        os.kill(os.getpid(), signal.SIGKILL)  # finished, but the result never got out
    return {"loss": loss}
