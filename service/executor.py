"""The one seam to Ray: turns the scheduler's decisions into Ray calls.

Attempts run under one detached, named dispatcher actor
(:class:`hpo.workers.runner.TrialDispatcher`) that reserves a placement group with one bundle
per DDP rank for each attempt and runs the ranks inside it. Everything Ray-specific stays in
this module and in ``hpo.workers.runner``; the scheduler sees :class:`AttemptStatus` records.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("hpo.executor")


@dataclass
class AttemptStatus:
    """How one attempt stands, as its supervisor reports it."""

    trial_id: int
    attempt: int
    state: str  # pending | running | done | failed | cancelled | lost
    placements: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: tuple[str, int] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclass
class _Tracked:
    attempt: int
    key: str
    needs: dict[str, float]


class RayExecutor:
    """Runs attempts on a local Ray instance (``address=None``) or an existing cluster."""

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        object_store_mb: int = 512,
        env: dict[str, str] | None = None,
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.object_store_mb = object_store_mb
        self.env = env or {}
        self._tracked: dict[int, _Tracked] = {}
        self._evaluations: dict[int, Any] = {}
        self._dispatcher: Any = None

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Connect to Ray (or start a local instance) and find or create the dispatcher."""
        if self.address:  # Ray 2.5x clusters use token auth; Ray reads this on import
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        import ray

        from hpo.workers.runner import DISPATCHER, TrialDispatcher

        if self._dispatcher is not None:
            return
        runtime_env = {"env_vars": self.env} if self.env else None
        if self.address:
            ray.init(address=self.address, namespace=_namespace(), runtime_env=runtime_env)
        else:
            ray.init(
                address="local",
                namespace=_namespace(),
                include_dashboard=False,
                num_cpus=self.num_cpus,
                num_gpus=self.num_gpus,
                object_store_memory=self.object_store_mb * 1024 * 1024,
                runtime_env=runtime_env,
                configure_logging=False,
            )
        self._dispatcher = TrialDispatcher.options(
            name=DISPATCHER, namespace=_namespace(), lifetime="detached", get_if_exists=True
        ).remote()
        log.info("connected to Ray: %s", ray.cluster_resources())

    def shutdown(self) -> None:
        """Disconnect. On a local instance that ends every attempt; on a cluster they go on
        and the next control plane re-adopts them."""
        import ray

        if self._dispatcher is None:
            return
        started = [] if self.address else _descendants(os.getpid())
        ray.shutdown()
        self._dispatcher = None
        self._tracked.clear()
        self._evaluations.clear()
        _reap(started)  # Ray leaves its agent processes behind when the local raylet exits

    @property
    def started(self) -> bool:
        return self._dispatcher is not None

    # ---------------------------------------------------------------- attempts

    def launch(self, launch: Any) -> None:
        """Start an attempt (a :class:`~hpo.workers.runner.TrialLaunch`)."""
        import ray

        key = ray.get(self._dispatcher.start.remote(launch), timeout=60)
        needs = _needs(launch.workers, launch.cpus_per_worker, launch.gpus_per_worker)
        self._tracked[launch.trial_id] = _Tracked(launch.attempt, key, needs)

    def adopt(self, trial_id: int, attempt: int, needs: dict[str, float]) -> bool:
        """Take over an attempt a previous control plane launched, if Ray still runs it."""
        import ray

        from hpo.workers.runner import attempt_key

        key = attempt_key(trial_id, attempt)
        status = ray.get(self._dispatcher.status.remote([key]), timeout=60)[key]
        if status is None:
            return False
        self._tracked[trial_id] = _Tracked(attempt, key, needs)
        return True

    def tracked(self) -> dict[int, int]:
        """Trial id → attempt of everything in flight."""
        return {tid: t.attempt for tid, t in self._tracked.items()}

    def statuses(self) -> list[AttemptStatus]:
        """The status of every tracked attempt (one round trip to the dispatcher)."""
        import ray

        if not self._tracked:
            return []
        items = list(self._tracked.items())
        try:
            raw = ray.get(self._dispatcher.status.remote([t.key for _, t in items]), timeout=60)
        except Exception as exc:  # the dispatcher is gone, and every attempt with it
            lost = {
                "kind": type(exc).__name__,
                "message": f"the Ray dispatcher was lost: {type(exc).__name__}",
                "retryable": True,
                "traceback": str(exc)[-2000:],
            }
            return [AttemptStatus(tid, t.attempt, "lost", error=lost) for tid, t in items]
        out = []
        for trial_id, t in items:
            status = raw.get(t.key)
            if status is None:
                out.append(AttemptStatus(trial_id, t.attempt, "lost", error=_unknown(t.key)))
                continue
            out.append(
                AttemptStatus(
                    trial_id,
                    t.attempt,
                    status["state"],
                    placements=status["placements"],
                    checkpoint=tuple(status["checkpoint"]) if status["checkpoint"] else None,
                    result=status["result"],
                    error=status["error"],
                )
            )
        return out

    def release(self, trial_id: int) -> None:
        """Forget a finished attempt."""
        tracked = self._tracked.pop(trial_id, None)
        if tracked is not None and self._dispatcher is not None:
            self._dispatcher.forget.remote(tracked.key)

    def cancel(self, trial_id: int) -> None:
        """Stop an attempt now: its rank processes are killed and its resources freed."""
        import ray

        tracked = self._tracked.get(trial_id)
        if tracked is None:
            return
        with contextlib.suppress(Exception):
            ray.get(self._dispatcher.cancel.remote(tracked.key), timeout=30)
        self.release(trial_id)

    def evaluate(self, trial: Any, spec: Any, checkpoint: str) -> None:
        """Compute test metrics of ``trial``'s checkpoint in one Ray task (see ``evaluations``)."""
        import ray

        from hpo.workers.runner import run_evaluation

        res = spec.resources
        task = ray.remote(run_evaluation).options(
            num_cpus=res.cpus_per_worker, num_gpus=min(res.gpus_per_worker, 1), max_retries=1
        )
        ref = task.remote(
            spec.trainable.name,
            dict(spec.trainable.config),
            dict(trial.params),
            checkpoint,
            res.gpus_per_worker > 0,
        )
        self._evaluations[trial.id] = ref

    def evaluations(self) -> list[tuple[int, dict[str, Any] | None]]:
        """Evaluations that ended since the last call: (trial id, metrics or {"error": ...})."""
        import ray

        if not self._evaluations:
            return []
        refs = list(self._evaluations.values())
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        out = []
        for trial_id, ref in list(self._evaluations.items()):
            if ref not in done:
                continue
            del self._evaluations[trial_id]
            try:
                out.append((trial_id, ray.get(ref)))
            except Exception as exc:
                out.append((trial_id, {"error": f"{type(exc).__name__}: {str(exc)[-500:]}"}))
        return out

    def free(self, pending_ids: list[int]) -> dict[str, float]:
        """Cluster resources not yet claimed, minus what pending attempts will claim."""
        import ray

        free = dict(ray.available_resources())
        for trial_id in pending_ids:
            tracked = self._tracked.get(trial_id)
            if tracked is not None:
                for key, amount in tracked.needs.items():
                    free[key] = free.get(key, 0.0) - amount
        return free


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _reap(pids: list[int], grace_s: float = 5.0) -> None:
    """Terminate the processes of ``pids`` still alive; kill them after ``grace_s``."""
    alive = [p for p in pids if _signal(p, signal.SIGTERM)]
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _signal(p, 0)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _unknown(key: str) -> dict[str, Any]:
    return {
        "kind": "Lost",
        "message": f"the dispatcher does not know attempt {key}",
        "retryable": True,
        "traceback": "",
    }


def _needs(workers: int, cpus: float, gpus: float) -> dict[str, float]:
    needs = {"CPU": workers * cpus}
    if gpus:
        needs["GPU"] = workers * gpus
    return needs


def needs_of(resources: Any) -> dict[str, float]:
    """What a spec's ``resources`` occupy on the cluster."""
    return _needs(resources.workers_per_trial, resources.cpus_per_worker, resources.gpus_per_worker)


def fits(needs: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(key, 0.0) + 1e-9 >= amount for key, amount in needs.items())


def _namespace() -> str:
    return os.environ.get("HPO_RAY_NAMESPACE", "hpo")
