"""What a trainable gets: its settings, its rank, and the ways to report, stop and checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpo.workers import ddp
from hpo.workers.registry import TrainableError
from hpo.workers.reporter import MetricReporter


@dataclass
class Objective:
    metric: str
    direction: str

    def better(self, a: float, b: float) -> bool:
        return a < b if self.direction == "minimize" else a > b


@dataclass
class TrialContext:
    """Handed to ``train(ctx)`` on every rank of a trial.

    Collective calls (every rank must make them, in the same order): :meth:`report`,
    :meth:`should_stop`, :meth:`save_checkpoint`. Everything else is local.
    """

    trial_id: int
    study_id: int
    number: int
    attempt: int
    params: dict[str, Any]
    settings: Any
    rank: int
    world_size: int
    device: torch.device
    objectives: list[Objective]
    checkpoint_dir: Path
    trainable: str = ""
    resume_from: Path | None = None
    reporter: MetricReporter | None = None
    on_checkpoint: Callable[[str, int], None] | None = None
    sync_timeout_s: float = 2.0
    keep_checkpoints: int = 2
    last_step: int | None = None
    last: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    _at_last_step: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------- metrics

    def report(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Report metrics at ``step`` (an epoch, usually) and learn whether to stop.

        Every rank must call it with the same metrics (average them first, e.g. with
        :meth:`all_reduce_sum`). Rank 0 sends them and waits briefly for the server's answer;
        the early-stop decision is then broadcast, so all ranks stop together. A NaN or infinite
        value fails the trial with that reason.
        """
        values = _finite(step, metrics)
        self._track(step, values)
        stop = False
        if self.reporter is not None:
            ticket = self.reporter.log(step, values)
            self.reporter.wait_sent(ticket, self.sync_timeout_s)
            stop = self.reporter.should_stop
        return ddp.broadcast_flag(stop, self.device)

    def finish(self, metrics: Mapping[str, float]) -> None:
        """Final metrics a trainable returned: recorded at its last step (rank 0 sends the
        ones it has not already reported there)."""
        step = self.last_step or 0
        values = _finite(step, metrics)
        new = {k: v for k, v in values.items() if self._at_last_step.get(k) != v}
        self._track(step, values)
        if self.reporter is not None and new:
            self.reporter.log(step, new)

    def recall(self, reported: Callable[[str], list[tuple[int, float]]], up_to: int) -> None:
        """Seed the objectives' last/best values from what earlier attempts reported up to the
        resumed step, so an attempt that resumes after the final checkpoint (its predecessor
        finished, but the result never reached the control plane) still has a result."""
        for objective in self.objectives:
            for step, value in sorted(reported(objective.metric)):
                if step <= up_to:
                    self._track(step, {objective.metric: value})

    def _track(self, step: int, values: dict[str, float]) -> None:
        if step != self.last_step:
            self._at_last_step = {}
        self._at_last_step.update(values)
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        for objective in self.objectives:
            if objective.metric in values:
                value = values[objective.metric]
                self.last[objective.metric] = value
                current = self.best.get(objective.metric)
                if current is None or objective.better(value, current):
                    self.best[objective.metric] = value

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Stream metrics (e.g. the training loss every N steps) without waiting; rank 0 only
        sends. A non-finite value fails the trial."""
        values = _finite(step, metrics)
        if self.reporter is not None:
            self.reporter.log(step, values)

    def should_stop(self) -> bool:
        """Whether the control plane asked this trial to stop (collective)."""
        stop = bool(self.reporter and self.reporter.should_stop)
        return ddp.broadcast_flag(stop, self.device)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums over all ranks, e.g. ``[correct, total, loss_sum]``."""
        return ddp.all_reduce_sum(values, self.device)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (e.g. predictions for precision/recall/F1)."""
        return ddp.all_gather_objects(obj)

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, state: Mapping[str, Any], step: int, **meta: Any) -> Path | None:
        """Save ``state`` (tensors, numbers, strings) as the trial's checkpoint at ``step``.

        Rank 0 writes ``checkpoint-<step>/state.pt`` (loadable with ``weights_only=True``) and
        ``meta.json``; older checkpoints beyond ``keep_checkpoints`` are removed.
        """
        path = None
        if self.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            path = self.checkpoint_dir / f"checkpoint-{step:06d}"
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(dict(state), tmp / "state.pt")
            info = {
                "step": step,
                "trial_id": self.trial_id,
                "attempt": self.attempt,
                "trainable": self.trainable,
                "settings": _jsonable(self.settings),
                **meta,
            }
            (tmp / "meta.json").write_text(json.dumps(info, default=str))
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
            self._prune_checkpoints()
            if self.on_checkpoint is not None:
                self.on_checkpoint(str(path), step)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return path

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint this attempt resumes from (a retry after a failure), or None."""
        if self.resume_from is None:
            return None
        return torch.load(
            self.resume_from / "state.pt", map_location=self.device, weights_only=True
        )

    def _prune_checkpoints(self) -> None:
        found = sorted(p for p in self.checkpoint_dir.glob("checkpoint-*") if p.is_dir())
        for old in found[: -self.keep_checkpoints]:
            if self.resume_from is None or old.resolve() != self.resume_from.resolve():
                shutil.rmtree(old, ignore_errors=True)

    # --------------------------------------------------------------- helpers

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move ``model`` to this rank's device and wrap it in DistributedDataParallel."""
        model = model.to(self.device)
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sampler(self, dataset: Any, *, shuffle: bool, seed: int = 0) -> Any:
        """A DistributedSampler giving this rank its shard of ``dataset``."""
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=seed
        )


def _jsonable(settings: Any) -> Any:
    return settings.model_dump(mode="json") if hasattr(settings, "model_dump") else settings


def _finite(step: int, metrics: Mapping[str, float]) -> dict[str, float]:
    values = {k: float(v) for k, v in metrics.items()}
    for name, value in values.items():
        if not math.isfinite(value):
            raise TrainableError(f"{name} is {value} at step {step}: training diverged")
    return values
