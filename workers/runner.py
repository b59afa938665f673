"""Trials on Ray: for each attempt, a placement group with one bundle per DDP rank and one Ray
task per rank inside it, run by a detached dispatcher actor that keeps each outcome.

The dispatcher is named (``DISPATCHER``) and outlives the control plane's process, so a restarted
control plane finds it again with ``ray.get_actor``, re-adopts the attempts it still runs, and
never launches a second copy of one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger("hpo.workers.runner")
DISPATCHER = "hpo-dispatcher-v1"


@dataclass(frozen=True)
class TrialLaunch:
    """Everything the workers need to run one attempt of a trial (no database access)."""

    trial_id: int
    study_id: int
    number: int
    attempt: int
    trainable: str
    config: dict[str, Any]
    params: dict[str, Any]
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    api_url: str
    token: str | None
    objectives: list[tuple[str, str]]
    keep_metrics: list[str]
    checkpoint_dir: str
    resume_from: str | None = None
    lease_s: float = 300.0
    strategy: str = "PACK"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return attempt_key(self.trial_id, self.attempt)


def run_rank(launch: TrialLaunch, rank: int, dispatcher: Any, key: str) -> dict[str, Any]:
    """The body of one DDP rank: join the group, run the trainable, report, clean up."""
    from hpo.workers import ddp, registry
    from hpo.workers.context import Objective, TrialContext
    from hpo.workers.reporter import MetricReporter

    for key, value in launch.env.items():
        os.environ[key] = value
    context = ray.get_runtime_context()
    node_ip = ray.util.get_node_ip_address()
    use_gpu = launch.gpus_per_worker > 0
    device = ddp.init_process_group(
        rank,
        launch.workers,
        node_ip,
        publish=lambda address: ray.get(dispatcher.publish_master.remote(key, address)),
        lookup=lambda: ray.get(dispatcher.master.remote(key)),
        use_gpu=use_gpu,
    )
    where = ddp.placement(rank, node_ip, context.get_node_id(), device, ray.get_gpu_ids())
    dispatcher.note_placement.remote(key, rank, where.as_dict())
    reporter = None
    try:
        fn = registry.load(launch.trainable)
        settings = registry.settings_for(fn, launch.config, launch.params)
        if rank == 0:
            reporter = MetricReporter(
                launch.api_url,
                launch.trial_id,
                token=launch.token,
                keep=tuple(launch.keep_metrics),
                heartbeat_s=max(1.0, min(30.0, launch.lease_s / 4)),
            )
        ctx = TrialContext(
            trial_id=launch.trial_id,
            study_id=launch.study_id,
            number=launch.number,
            attempt=launch.attempt,
            params=dict(launch.params),
            settings=settings,
            rank=rank,
            world_size=launch.workers,
            device=device,
            objectives=[Objective(m, d) for m, d in launch.objectives],
            trial_dir=Path(launch.checkpoint_dir),  # resumes only from checkpoints inside it
            trainable=launch.trainable,
            reporter=reporter,
            on_checkpoint=lambda path, step: dispatcher.note_checkpoint.remote(key, path, step),
        )
        returned = fn(ctx)
        if returned:
            ctx.finish(returned)
        summary = {"last": ctx.last, "best": ctx.best, "extra": ctx.extra}
        if reporter is not None:
            summary["metrics_sent"] = reporter.close(timeout=30)
            summary["metrics_dropped"] = reporter.dropped
            reporter = None
        return summary
    finally:
        if reporter is not None:
            reporter.close(timeout=5)
        ddp.shutdown()


def run_evaluation(
    trainable: str, config: dict[str, Any], params: dict[str, Any], checkpoint: str, gpu: bool
) -> dict[str, float] | None:
    """Held-out test metrics of a checkpoint, from the trainable's ``evaluate`` (or None)."""
    import torch

    from hpo.workers import registry

    fn = registry.load(trainable)
    if getattr(fn, "evaluate", None) is None:
        return None
    settings = registry.settings_for(fn, config, params)
    device = torch.device("cuda", 0) if gpu and torch.cuda.is_available() else torch.device("cpu")
    metrics = fn.evaluate(Path(checkpoint), settings, device)
    return {k: float(v) for k, v in metrics.items()}


_remote_rank = ray.remote(run_rank)


class _Attempt:
    """The dispatcher's record of one attempt."""

    def __init__(self, launch: TrialLaunch) -> None:
        self.launch = launch
        self.state = "pending"  # pending -> running -> done | failed | cancelled
        self.master_address: tuple[str, int] | None = None
        self.placements: dict[int, dict[str, Any]] = {}
        self.checkpoint: tuple[str, int] | None = None
        self.result: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.refs: list[Any] = []
        self.pg: Any = None
        self.task: asyncio.Task | None = None

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "placements": [self.placements[r] for r in sorted(self.placements)],
            "checkpoint": self.checkpoint,
            "result": self.result,
            "error": self.error,
        }


@ray.remote(num_cpus=0, max_restarts=0)
class TrialDispatcher:
    """Runs every attempt the control plane launches, and remembers how each went.

    One long-lived actor owns all rank tasks, so Ray reuses the warm worker processes (torch
    already imported, data cached) from one trial to the next: the gap between trials is a few
    milliseconds instead of a process start. Attempts are keyed ``"<trial_id>/<attempt>"``.
    """

    def __init__(self) -> None:
        self.attempts: dict[str, _Attempt] = {}

    async def start(self, launch: TrialLaunch) -> str:
        key = attempt_key(launch.trial_id, launch.attempt)
        if key not in self.attempts:  # idempotent: a second start never runs it twice
            attempt = _Attempt(launch)
            self.attempts[key] = attempt
            attempt.task = asyncio.get_running_loop().create_task(self._run(key, attempt))
        return key

    async def _run(self, key: str, attempt: _Attempt) -> None:
        launch = attempt.launch
        bundle = {"CPU": launch.cpus_per_worker}
        if launch.gpus_per_worker:
            bundle["GPU"] = launch.gpus_per_worker
        attempt.pg = placement_group([dict(bundle)] * launch.workers, strategy=launch.strategy)
        try:
            await attempt.pg.ready()
            attempt.state = "running"
            me = ray.get_runtime_context().current_actor
            attempt.refs = [
                _remote_rank.options(
                    num_cpus=launch.cpus_per_worker,
                    num_gpus=launch.gpus_per_worker,
                    max_retries=0,
                    name=f"trial-{launch.trial_id}-rank-{rank}",
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        attempt.pg, placement_group_bundle_index=rank
                    ),
                ).remote(launch, rank, me, key)
                for rank in range(launch.workers)
            ]
            futures = [asyncio.ensure_future(_await(ref)) for ref in attempt.refs]
            results = await _first_failure(futures)
            attempt.result = results[0]
            attempt.state = "done"
        except asyncio.CancelledError:
            attempt.state = "cancelled"
        except Exception as exc:  # a rank died or raised: stop the others, keep the reason
            attempt.error = _describe(exc)
            attempt.state = "failed"
        finally:
            _cancel_unfinished(attempt.refs)
            remove_placement_group(attempt.pg)

    def keys(self) -> list[str]:
        return list(self.attempts)

    def status(self, keys: list[str]) -> dict[str, dict[str, Any] | None]:
        """State, rank placements, newest checkpoint and outcome of each attempt."""
        return {k: (self.attempts[k].status() if k in self.attempts else None) for k in keys}

    async def cancel(self, key: str) -> None:
        attempt = self.attempts.get(key)
        if attempt is None:
            return
        _cancel_unfinished(attempt.refs)
        if attempt.task is not None and not attempt.task.done():
            attempt.task.cancel()

    def forget(self, key: str) -> None:
        self.attempts.pop(key, None)

    # called by the ranks
    def publish_master(self, key: str, address: tuple[str, int]) -> None:
        self.attempts[key].master_address = tuple(address)

    def master(self, key: str) -> tuple[str, int] | None:
        attempt = self.attempts.get(key)
        return None if attempt is None else attempt.master_address

    def note_placement(self, key: str, rank: int, where: dict[str, Any]) -> None:
        if key in self.attempts:
            self.attempts[key].placements[rank] = where

    def note_checkpoint(self, key: str, path: str, step: int) -> None:
        if key in self.attempts:
            self.attempts[key].checkpoint = (path, step)


def attempt_key(trial_id: int, attempt: int) -> str:
    return f"{trial_id}/{attempt}"


def _cancel_unfinished(refs: list[Any]) -> None:
    """Force-stop ranks still running (never a finished one: its process is reused)."""
    if not refs:
        return
    _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
    for ref in running:
        ray.cancel(ref, force=True)


async def _await(ref: Any) -> Any:
    return await ref


async def _first_failure(futures: list[asyncio.Future]) -> list[Any]:
    """All results, or the first exception as soon as any rank fails."""
    done, pending = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
    failures = [f.exception() for f in done if f.exception() is not None]
    if failures:
        for other in pending:  # their ranks get force-cancelled; their errors say nothing new
            other.add_done_callback(lambda f: f.cancelled() or f.exception())
            other.cancel()
        raise failures[0]
    return [f.result() for f in futures]


def _traceback(exc: BaseException, cause: BaseException) -> str:
    if isinstance(exc, ray.exceptions.RayTaskError):  # str() holds the remote frames
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        return "Traceback (most recent call last, remote):\n" + text
    return "".join(traceback.format_exception(cause))


def _describe(exc: BaseException) -> dict[str, Any]:
    """Why an attempt failed, and whether a retry can help (not after a TrainableError)."""
    from hpo.workers.registry import TrainableError

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
    if isinstance(exc, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        kind, message = "WorkerDied", str(exc).strip().splitlines()[0]
    else:
        kind, message = type(cause).__name__, str(cause).strip().splitlines()[-1:] or [""]
        message = message[0]
    return {
        "kind": kind,
        "message": f"{kind}: {message}",
        "retryable": not isinstance(cause, TrainableError),
        "traceback": _traceback(exc, cause)[-4000:],
    }
