"""Trials on Ray: for each attempt, a placement group with one bundle per DDP rank and one Ray
task per rank inside it, run by a detached dispatcher actor that keeps each outcome.

The dispatcher is named (``DISPATCHER``) and outlives the control plane's process, so a restarted
control plane finds it again with ``ray.get_actor``, re-adopts the attempts it still runs, and
never launches a second copy of one. Starting attempt N of a trial cancels any other attempt of
it the dispatcher still runs, so two attempts of one trial never run together. The records that
cross to the control plane are the typed ones of ``hpo.service.executor``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import traceback
from pathlib import Path
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from hpo.service.executor import (
    AttemptError,
    AttemptLaunch,
    AttemptRef,
    AttemptResult,
    AttemptState,
    AttemptStatus,
    Checkpoint,
    FailureClass,
    RankPlacement,
)

log = logging.getLogger("hpo.workers.runner")
DISPATCHER = "hpo-dispatcher-v2"  # v2: attempts keyed by AttemptRef, typed statuses


def run_rank(
    launch: AttemptLaunch, rank: int, dispatcher: ActorHandle, key: AttemptRef
) -> dict[str, Any]:
    """The body of one DDP rank: join the group, run the trainable, report, clean up.

    The control plane's secrets (admin token, database URL) are removed from the process's
    environment first: a rank holds its attempt's token and nothing more."""
    import os

    from hpo.service.executor import control_plane_secrets
    from hpo.workers import ddp, registry, storage
    from hpo.workers.context import Objective, TrialContext
    from hpo.workers.reporter import MetricReporter
    from hpo.workers.tensorboard import LiveScalars

    for name in control_plane_secrets(os.environ):  # a cluster's workers may have them
        os.environ.pop(name, None)
    os.environ.update(launch.storage_env)  # the object store's settings, if any
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
        socket_ifname=launch.socket_ifname,
    )
    where = ddp.placement(rank, node_ip, context.get_node_id(), device, ray.get_gpu_ids())
    dispatcher.note_placement.remote(key, rank, where)
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
                mirror=(
                    LiveScalars(launch.tensorboard_dir, launch.attempt)
                    if launch.tensorboard_dir
                    else None
                ),
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
            # resumes only from checkpoints inside it; a URL stays a URL (object store)
            trial_dir=storage.location(launch.checkpoint_dir),
            trainable=launch.trainable,
            reporter=reporter,
            on_checkpoint=lambda path, step: dispatcher.note_checkpoint.remote(key, path, step),
            resume_from=launch.resume_from,
        )
        returned = fn(ctx)
        if returned:
            ctx.finish(returned)
        summary = {"last": ctx.last, "best": ctx.best, "extra": ctx.extra}
        if reporter is not None:
            reporter.close(timeout=30)
            summary["metrics_sent"] = reporter.sent
            summary["metrics_dropped"] = reporter.dropped
            summary["unsent"] = reporter.unsent()  # the control plane was away: it stores them
            reporter = None
        return summary
    finally:
        if reporter is not None:
            reporter.close(timeout=5)
        ddp.shutdown()


def run_evaluation(
    trainable: str,
    config: dict[str, Any],
    params: dict[str, Any],
    checkpoint: str,
    gpu: bool,
    storage_env: dict[str, str] | None = None,
) -> dict[str, float] | None:
    """Held-out test metrics of a checkpoint, from the trainable's ``evaluate`` (or None).

    A checkpoint on an object store is downloaded to a temporary folder first: ``evaluate``
    always gets a local directory. ``storage_env``: the object store's settings (see
    :attr:`hpo.service.executor.AttemptLaunch.storage_env`)."""
    import os
    import tempfile

    import torch

    from hpo.workers import registry, storage

    os.environ.update(storage_env or {})
    fn = registry.load(trainable)
    if getattr(fn, "evaluate", None) is None:
        return None
    settings = registry.settings_for(fn, config, params)
    device = torch.device("cuda", 0) if gpu and torch.cuda.is_available() else torch.device("cpu")
    where = storage.location(checkpoint)
    if isinstance(where, Path):
        metrics = fn.evaluate(where, settings, device)
    else:
        with tempfile.TemporaryDirectory(prefix="hpo-evaluate-") as tmp:
            metrics = fn.evaluate(storage.fetch(where, Path(tmp)), settings, device)
    return {k: float(v) for k, v in metrics.items()}


_remote_rank = ray.remote(run_rank)


class _Attempt:
    """The dispatcher's record of one attempt."""

    def __init__(self, launch: AttemptLaunch) -> None:
        self.launch = launch
        self.state = AttemptState.PENDING  # pending -> running -> done | failed | cancelled
        self.master_address: tuple[str, int] | None = None
        self.placements: dict[int, RankPlacement] = {}
        self.checkpoint: Checkpoint | None = None
        self.result: AttemptResult | None = None
        self.error: AttemptError | None = None
        self.refs: list[ray.ObjectRef] = []
        self.pg: PlacementGroup | None = None
        self.task: asyncio.Task | None = None

    def status(self) -> AttemptStatus:
        return AttemptStatus(
            self.launch.ref,
            self.state,
            placements=[self.placements[r] for r in sorted(self.placements)],
            checkpoint=self.checkpoint,
            result=self.result,
            error=self.error,
        )


@ray.remote(num_cpus=0, max_restarts=0)
class TrialDispatcher:
    """Runs every attempt the control plane launches, and remembers how each went.

    One long-lived actor owns all rank tasks, so Ray reuses the warm worker processes (torch
    already imported, data cached) from one trial to the next: the gap between trials is a few
    milliseconds instead of a process start. Attempts are keyed by :class:`AttemptRef`, and at
    most one attempt of a trial runs at a time.
    """

    def __init__(self, deployment: str | None = None) -> None:
        self.deployment = deployment  # in the names of the rank tasks (``ray list tasks``)
        self.attempts: dict[AttemptRef, _Attempt] = {}

    async def start(self, launch: AttemptLaunch) -> None:
        """Run ``launch`` once (a second start of it does nothing), after cancelling and
        forgetting every other attempt of its trial."""
        ref = launch.ref
        for other in [o for o in self.attempts if o.trial_id == ref.trial_id and o != ref]:
            log.info("attempt %s supersedes attempt %s: cancelling it", ref, other)
            await self._stop(other, wait_s=10)
            self.attempts.pop(other, None)
        if ref not in self.attempts:
            attempt = _Attempt(launch)
            self.attempts[ref] = attempt
            attempt.task = asyncio.get_running_loop().create_task(self._run(ref, attempt))

    async def _run(self, ref: AttemptRef, attempt: _Attempt) -> None:
        launch = attempt.launch
        bundle = {"CPU": launch.cpus_per_worker}
        if launch.gpus_per_worker:
            bundle["GPU"] = launch.gpus_per_worker
        attempt.pg = placement_group([dict(bundle)] * launch.workers, strategy="PACK")
        try:
            await attempt.pg.ready()
            attempt.state = AttemptState.RUNNING
            me = ray.get_runtime_context().current_actor
            attempt.refs = [
                _remote_rank.options(
                    num_cpus=launch.cpus_per_worker,
                    num_gpus=launch.gpus_per_worker,
                    max_retries=0,
                    name=rank_task_name(self.deployment, ref, rank),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        attempt.pg, placement_group_bundle_index=rank
                    ),
                ).remote(launch, rank, me, ref)
                for rank in range(launch.workers)
            ]
            futures = [asyncio.ensure_future(_await(r)) for r in attempt.refs]
            results = await _first_failure(futures)
            attempt.result = _result(results[0])
            attempt.state = AttemptState.DONE
        except asyncio.CancelledError:
            attempt.state = AttemptState.CANCELLED
        except Exception as exc:  # a rank died or raised: stop the others, keep the reason
            attempt.error = _describe(exc)
            attempt.state = AttemptState.FAILED
        finally:
            _cancel_unfinished(attempt.refs)
            remove_placement_group(attempt.pg)

    def status(self, refs: list[AttemptRef]) -> dict[AttemptRef, AttemptStatus | None]:
        """State, rank placements, newest checkpoint and outcome of each attempt (None for
        an attempt the dispatcher does not know)."""
        return {r: (self.attempts[r].status() if r in self.attempts else None) for r in refs}

    async def cancel(self, ref: AttemptRef) -> None:
        """Kill the attempt's ranks; its placement group is removed as its task ends."""
        await self._stop(ref, wait_s=0)

    async def _stop(self, ref: AttemptRef, *, wait_s: float) -> None:
        attempt = self.attempts.get(ref)
        if attempt is None:
            return
        _cancel_unfinished(attempt.refs)
        task = attempt.task
        if task is not None and not task.done():
            task.cancel()
            if wait_s:  # let it release its placement group before another attempt asks
                await asyncio.wait([task], timeout=wait_s)

    def forget(self, ref: AttemptRef) -> None:
        self.attempts.pop(ref, None)

    # called by the ranks
    def publish_master(self, ref: AttemptRef, address: tuple[str, int]) -> None:
        self.attempts[ref].master_address = tuple(address)

    def master(self, ref: AttemptRef) -> tuple[str, int] | None:
        attempt = self.attempts.get(ref)
        return None if attempt is None else attempt.master_address

    def note_placement(self, ref: AttemptRef, rank: int, where: RankPlacement) -> None:
        if ref in self.attempts:
            self.attempts[ref].placements[rank] = where

    def note_checkpoint(self, ref: AttemptRef, path: str, step: int) -> None:
        if ref in self.attempts:
            self.attempts[ref].checkpoint = Checkpoint(path, step)


def rank_task_name(deployment: str | None, ref: AttemptRef, rank: int) -> str:
    """The Ray task name of one rank: deployment, trial, attempt and rank, so ``ray list
    tasks`` on a shared cluster tells deployments apart."""
    prefix = f"hpo-{deployment}" if deployment else "hpo"
    return f"{prefix}-trial-{ref.trial_id}-attempt-{ref.attempt}-rank-{rank}"


def _result(summary: dict[str, Any]) -> AttemptResult:
    """Rank 0's summary as the typed result."""
    return AttemptResult(
        last=dict(summary.get("last") or {}),
        best=dict(summary.get("best") or {}),
        extra=dict(summary.get("extra") or {}),
        metrics_sent=int(summary.get("metrics_sent") or 0),
        metrics_dropped=int(summary.get("metrics_dropped") or 0),
        unsent=list(summary.get("unsent") or []),
    )


def _cancel_unfinished(refs: list[Any]) -> None:
    """Force-stop ranks still running (never a finished one: its process is reused)."""
    if not refs:
        return
    _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
    for ref in running:
        ray.cancel(ref, force=True)


async def _await(ref: Any) -> Any:
    return await ref


# How long the other ranks of a failed attempt get to end on their own before they are
# force-cancelled. They usually do at once: the failing rank tears its process group down, so
# a peer blocked in a collective raises too, and a deterministic error (a diverged loss,
# all-reduced) is raised by every rank at the same step. Each force-cancel kills a warm
# process, and one that raced a finishing rank is the suspected trigger of the aborts of Ray
# 2.60's core worker seen twice in CI (``task_manager.cc … CompletePendingTask``); the grace
# makes that race rare (a rank ending just as it runs out), it does not remove it.
SIBLING_GRACE_S = 3.0


async def _first_failure(futures: list[asyncio.Future]) -> list[Any]:
    """All results; or, once any rank fails and the others have ended or had
    :data:`SIBLING_GRACE_S` to, the failure to report: a rank's process that died (the
    others' errors follow from losing their peer, and it is retried without cost) before the
    first error raised."""
    done, pending = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
    first = [f.exception() for f in done if f.exception() is not None]
    if not first:
        return [f.result() for f in futures]
    try:
        if pending:
            await asyncio.wait(pending, timeout=SIBLING_GRACE_S)
        ended = [f for f in futures if f.done() and not f.cancelled()]
        later = [f.exception() for f in ended if f.exception() is not None]
        failures = first + [e for e in later if e not in first]
        raise _to_report(failures)
    finally:
        for other in futures:  # ranks still running get force-cancelled by the caller
            other.add_done_callback(lambda f: f.cancelled() or f.exception())
            other.cancel()


def _to_report(failures: list[BaseException]) -> BaseException:
    """Of the ranks' failures, the one that says why: a rank's process that died (the others'
    errors follow from losing their peer), else an error that is not a rank's echo of
    another's divergence (:class:`~hpo.workers.guards.PeerDiverged`), else the first."""
    from hpo.workers.guards import PeerDiverged

    def echo(e: BaseException) -> bool:
        cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause else e
        return isinstance(cause, PeerDiverged)

    died = next((e for e in failures if isinstance(e, _INFRASTRUCTURE)), None)
    return died or next((e for e in failures if not echo(e)), failures[0])


def _traceback(exc: BaseException, cause: BaseException) -> str:
    if isinstance(exc, ray.exceptions.RayTaskError):  # str() holds the remote frames
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        return "Traceback (most recent call last, remote):\n" + text
    return "".join(traceback.format_exception(cause))


# Ray's word that a rank's process or node went away (an OOM kill, a lost or preempted node,
# a dead placement group): the infrastructure's failure, not the trainable's.
_INFRASTRUCTURE = (
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ActorDiedError,
    ray.exceptions.OutOfMemoryError,
    ray.exceptions.ObjectLostError,
)


def _describe(exc: BaseException) -> AttemptError:
    """Why an attempt failed, and whether a retry can help (not after a TrainableError)."""
    from pydantic import ValidationError

    from hpo.workers.registry import TrainableError

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
    deterministic = isinstance(cause, (TrainableError, ValidationError))  # NaN, bad settings
    if isinstance(exc, _INFRASTRUCTURE):
        kind, message = "WorkerDied", str(exc).strip().splitlines()[0]
        failure_class = FailureClass.INFRASTRUCTURE
    else:
        kind, lines = type(cause).__name__, str(cause).strip().splitlines()[-1:] or [""]
        message = lines[0]
        failure_class = FailureClass.DETERMINISTIC if deterministic else FailureClass.TRAINABLE
    return AttemptError(
        kind=kind,
        message=f"{kind}: {message}",
        retryable=not deterministic,
        traceback=_traceback(exc, cause)[-4000:],
        failure_class=failure_class,
    )
