"""What a trainable gets: its settings, its rank, and the ways to report, stop, save and resume.

The checkpoint life cycle belongs here, so a trainable is only its model, data and loop::

    state = {"model": model, "optimizer": optimizer, "scheduler": schedule, "guard": guard}
    resumed = ctx.resume(**state)                      # None on a fresh start
    for epoch in range(resumed.next_step if resumed else 1, epochs + 1):
        ...
        if ctx.report(epoch, metrics, checkpoint=state):   # pruned or stopped: all ranks
            return

``report`` sends the metrics first, then saves the checkpoint with those metrics recorded in
it, so a crash between the two never loses a point: ``resume`` sends again what the control
plane may not have received.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data.distributed import DistributedSampler

from hpo.workers import checkpoints, ddp, storage
from hpo.workers.registry import TrainableError
from hpo.workers.reporter import MetricReporter
from hpo.workers.storage import Location


@dataclass
class Objective:
    metric: str
    direction: str

    def better(self, a: float, b: float) -> bool:
        return a < b if self.direction == "minimize" else a > b


@dataclass(frozen=True)
class Resumed:
    """What :meth:`TrialContext.resume` restored: the checkpoint's ``step`` (done already),
    the plain values saved beside the stateful objects, and where it was read from (a Path,
    or the checkpoint's URL on an object store). ``copied_from``: the trial whose checkpoint
    it is when not this one's (PBT copied it). ``retuned``: the checkpoint was saved with
    other settings than this attempt's (PBT copied another trial's, or a replayed schedule
    moved on to its next segment): its optimizer and schedule hold those hyperparameters,
    which the trainable replaces with its own (``Schedule.rebase``)."""

    step: int
    values: dict[str, Any]
    path: Location
    copied_from: int | None = None
    retuned: bool = False

    @property
    def next_step(self) -> int:
        """The first step this attempt has to run."""
        return self.step + 1


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` whose epoch (the shuffle of the next pass) is saved and
    restored with the checkpoint."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])


@dataclass
class TrialContext:
    """Handed to ``train(ctx)`` on every rank of a trial.

    Collective calls (every rank must make them, in the same order): :meth:`report`,
    :meth:`save`, :meth:`resume`, :meth:`should_stop`, :meth:`all_reduce_sum`,
    :meth:`all_gather`. Everything else is local. This attempt writes its checkpoints into
    ``trial_dir/attempt-<attempt>`` and resumes only from earlier attempts' checkpoints inside
    ``trial_dir`` (a shared folder, or an object store URL: see :mod:`hpo.workers.storage`).
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
    trial_dir: Location
    trainable: str = ""
    reporter: MetricReporter | None = None
    on_checkpoint: Callable[[str, int], None] | None = None
    # The checkpoint a promoted (paused, then resumed) trial must continue from; None: the
    # newest readable one of an earlier attempt, if any.
    resume_from: str | None = None
    sync_timeout_s: float = 2.0  # how long report() waits for the server's answer
    delivery_timeout_s: float = 10.0  # how long a checkpoint waits for its step's points
    keep_checkpoints: int = 2
    last_step: int | None = None
    last: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    _at_last_step: dict[str, float] = field(default_factory=dict, repr=False)
    _ticket: int = field(default=0, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoint_dir(self) -> Location:
        """Where this attempt's checkpoints go."""
        return checkpoints.attempt_folder(self.trial_dir, self.attempt)

    # ---------------------------------------------------------------- metrics

    def report(
        self, step: int, metrics: Mapping[str, float], checkpoint: Mapping[str, Any] | None = None
    ) -> bool:
        """Report metrics at ``step`` (an epoch, usually), save ``checkpoint`` if given (as
        :meth:`save` does), and learn whether to stop.

        Every rank must call it with the same metrics (average them first, e.g. with
        :meth:`all_reduce_sum`). Rank 0 sends them and waits briefly for the server's answer;
        the stop decision is then broadcast, so all ranks stop together. A NaN or infinite
        value fails the trial with :class:`TrainableError`.
        """
        values = _finite(step, metrics)
        self._track(step, values)
        if self.reporter is not None:
            self._ticket = self.reporter.log(step, values)
            self.reporter.wait_sent(self._ticket, self.sync_timeout_s)
        if checkpoint is not None:
            self.save(step, **checkpoint)
        return self.should_stop()

    def finish(self, metrics: Mapping[str, float]) -> None:
        """Final metrics a trainable returned: recorded at its last step (rank 0 sends the
        ones it has not already reported there)."""
        step = self.last_step or 0
        values = _finite(step, metrics)
        new = {k: v for k, v in values.items() if self._at_last_step.get(k) != v}
        self._track(step, values)
        if self.reporter is not None and new:
            self.reporter.log(step, new)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Stream metrics (e.g. the training loss every N steps) without waiting; rank 0 only
        sends. A non-finite value fails the trial."""
        values = _finite(step, metrics)
        if self.reporter is not None:
            # the newest ticket: a checkpoint saved after this waits for these points too, or
            # records them as unsent (it recorded only the last report's)
            self._ticket = self.reporter.log(step, values)

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

    # ------------------------------------------------------------ checkpoints

    def save(self, step: int, /, **state: Any) -> Location | None:
        """Save ``state`` as this attempt's checkpoint at ``step`` (collective).

        A value with ``state_dict()`` (model, optimizer, scheduler, sampler, guards) is saved
        as its state dict, a DDP-wrapped model unwrapped first; other values (tensors, numbers,
        strings) as they are. Rank 0 writes ``checkpoint-<step>`` atomically, with the metrics
        reported at ``step`` (waiting up to ``delivery_timeout_s`` for the server to confirm
        them) and the best/last values so far; older checkpoints beyond ``keep_checkpoints``
        go. Returns the path (a URL on an object store) on rank 0, None on the others.
        """
        path = None
        if self.is_main:
            saved = {key: _state_of(value) for key, value in state.items()}
            path = checkpoints.write(self.checkpoint_dir, step, saved, self._meta(step))
            checkpoints.prune(self.checkpoint_dir, self.keep_checkpoints)
            if self.on_checkpoint is not None:
                self.on_checkpoint(str(path), step)
        ddp.barrier()
        return path

    def resume(self, **state: Any) -> Resumed | None:
        """Restore ``state`` (the objects given to :meth:`save`, by the same names) from the
        newest readable checkpoint an earlier attempt of this trial left (collective).

        A promoted trial resumes from exactly the checkpoint it paused with
        (``resume_from``), and raises :class:`TrainableError` when that one does not read
        back. Returns None on a fresh start. Otherwise it loads each object's state dict, restores
        the best/last values, re-sends the resumed step's metrics if the server may not have
        them, and returns the step and the plain values saved. A newest checkpoint that does
        not read back is skipped for the one before it. Raises :class:`TrainableError` when
        the checkpoint lacks one of the names asked for.
        """
        found = None
        if self.is_main:
            if self.resume_from is not None:
                earlier = [storage.location(self.resume_from)]
            else:
                earlier = checkpoints.candidates(self.trial_dir, before_attempt=self.attempt)
            found = checkpoints.load_newest(earlier, self.device)
        chosen = ddp.all_gather_objects(None if found is None else str(found[0]))[0]
        if chosen is None and self.resume_from is not None:  # every rank raises the same
            raise TrainableError(
                f"cannot resume from checkpoint {self.resume_from}: it is missing or unreadable"
            )
        if chosen is None:
            return None
        path = storage.location(chosen)
        saved, meta = found[1:] if found is not None else checkpoints.load(path, self.device)
        for key, target in state.items():
            if key not in saved:
                raise TrainableError(f"checkpoint {path} holds no {key!r} to resume from")
            _unwrap(target).load_state_dict(saved[key])
        self._restore_progress(meta)
        owner = int(meta.get("trial_id", self.trial_id))
        if self.is_main and owner == self.trial_id:
            self._resend(meta)  # not another trial's points (a PBT copy)
        values = {k: v for k, v in saved.items() if k not in state}
        copied = None if owner == self.trial_id else owner
        settings = json.loads(json.dumps(_jsonable(self.settings)))  # as meta.json holds them
        retuned = copied is not None or meta.get("settings", settings) != settings
        return Resumed(int(meta["step"]), values, path, copied, retuned)

    def _meta(self, step: int) -> dict[str, Any]:
        metrics = dict(self._at_last_step) if self.last_step == step else {}
        delivered = False
        if metrics and self.reporter is not None:
            delivered = self.reporter.wait_sent(self._ticket, self.delivery_timeout_s)
        unsent = [] if delivered or self.reporter is None else self.reporter.unsent()
        return {
            "step": step,
            "trial_id": self.trial_id,
            "attempt": self.attempt,
            "trainable": self.trainable,
            "settings": _jsonable(self.settings),
            "metrics": metrics,
            "delivered": delivered,
            # Every point not acknowledged yet, not only this step's: while the control plane
            # is away, several checkpoints may pass before a crash, and resume re-sends these.
            "unsent": unsent,
            "last": self.last,
            "best": self.best,
        }

    def _restore_progress(self, meta: Mapping[str, Any]) -> None:
        self.last_step = int(meta["step"])
        self.last = dict(meta.get("last", {}))
        self.best = dict(meta.get("best", {}))
        self._at_last_step = dict(meta.get("metrics", {}))

    def _resend(self, meta: Mapping[str, Any]) -> None:
        """Send again the points the checkpoint recorded as unacknowledged that the control
        plane does not hold (an attempt that died before the server answered)."""
        if self.reporter is None or meta.get("delivered"):
            return
        step = int(meta["step"])
        unsent = meta.get("unsent")
        if unsent is None:  # a checkpoint written before "unsent" was recorded
            unsent = [{"step": step, "name": k, "value": v} for k, v in meta["metrics"].items()]
        held = {
            name: {s for s, _ in self.reporter.reported(name)}
            for name in {p["name"] for p in unsent}
        }
        by_step: dict[int, dict[str, float]] = {}
        for point in unsent:
            if point["step"] not in held[point["name"]]:
                by_step.setdefault(int(point["step"]), {})[point["name"]] = float(point["value"])
        for point_step, values in sorted(by_step.items()):
            self._ticket = self.reporter.log(point_step, values)

    # --------------------------------------------------------------- helpers

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move ``model`` to this rank's device and wrap it in DistributedDataParallel."""
        model = model.to(self.device)
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def reseed(self, seed: int, step: int) -> None:
        """Seed torch's generators for what is drawn from ``step`` on (dropout, augmentation)
        from ``(seed, step, rank)``: a resumed attempt draws what an uninterrupted one drew
        after its checkpoint (restarting from ``seed`` replayed the first epoch's draws),
        and each rank draws its own. Call it at each step a checkpoint may be taken at."""
        key = hashlib.blake2b(f"{seed}:{step}:{self.rank}".encode(), digest_size=8).digest()
        torch.manual_seed(int.from_bytes(key, "big"))

    def sampler(self, dataset: Any, *, shuffle: bool, seed: int = 0) -> ResumableSampler:
        """A DistributedSampler giving this rank its shard of ``dataset`` (resumable)."""
        return ResumableSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=seed
        )


def _unwrap(obj: Any) -> Any:
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return obj.module if isinstance(obj, wrappers) else obj


def _state_of(value: Any) -> Any:
    value = _unwrap(value)
    return value.state_dict() if hasattr(value, "state_dict") else value


def _jsonable(settings: Any) -> Any:
    return settings.model_dump(mode="json") if hasattr(settings, "model_dump") else settings


def _finite(step: int, metrics: Mapping[str, float]) -> dict[str, float]:
    values = {k: float(v) for k, v in metrics.items()}
    for name, value in values.items():
        if not math.isfinite(value):
            raise TrainableError(f"{name} is {value} at step {step}: training diverged")
    return values
