"""The :class:`~hpo.service.executor.Executor` on Ray: the only module of the control plane that
talks to Ray.

Attempts run under one detached, named dispatcher actor
(:class:`hpo.workers.runner.TrialDispatcher`) that reserves a placement group with one bundle
per DDP rank for each attempt and runs the ranks inside it. Everything Ray-specific stays in
this module and in ``hpo.workers.runner``; the scheduler sees the typed records of
``hpo.service.executor``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from hpo.service import local_ray
from hpo.service.executor import (
    PREFLIGHT_SCHEDULE,
    PREFLIGHT_TASK,
    AttemptError,
    AttemptLaunch,
    AttemptRef,
    AttemptState,
    AttemptStatus,
    ClusterNode,
    ClusterResources,
    EvaluationRequest,
    EvaluationResult,
    FailureClass,
    NodePreflight,
    PreflightRequest,
)

if TYPE_CHECKING:
    from ray.actor import ActorHandle
    from ray.remote_function import RemoteFunction
    from ray.types import ObjectRef

log = logging.getLogger("hpo.executor")


class RayExecutor:
    """Runs attempts on a local Ray instance (``address=None``) or an existing cluster.

    A local instance starts without the control plane's secrets in its environment (so no
    rank process inherits them) and, with ``session_file``, records its processes there; the
    next local start first ends what a killed predecessor left running (see
    :mod:`hpo.service.local_ray`).

    ``deployment`` (the id stored in the control plane's database) names the Ray namespace
    (``hpo-<id>``, unless ``namespace`` or ``HPO_RAY_NAMESPACE`` says otherwise) and the
    dispatcher, so deployments that share a cluster never see each other's attempts. A
    dispatcher that dies is replaced at once: the attempts it ran are reported ``lost`` as
    infrastructure losses, and a launch it failed goes to the new one.

    ``socket_ifname`` (``HPO_SOCKET_IFNAME``) is the network interface the ranks' gloo/NCCL
    bind to; without it each rank uses the interface holding its node's Ray address.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        object_store_mb: int = 512,
        env: dict[str, str] | None = None,
        session_file: Path | None = None,
        deployment: str | None = None,
        namespace: str | None = None,
        socket_ifname: str | None = None,
        storage_env: dict[str, str] | None = None,
    ) -> None:
        self.address = address
        # Object store credentials for ranks, evaluations and preflights: passed as task
        # arguments, never in the runtime_env (``env``), which Ray logs on every node.
        self.storage_env = dict(storage_env or {})
        self.socket_ifname = socket_ifname
        self.deployment = deployment
        self.namespace = namespace or namespace_of(deployment)
        self.session_file = None if address else session_file
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.object_store_mb = object_store_mb
        self.env = env or {}
        self._tracked: dict[AttemptRef, dict[str, float]] = {}  # attempt → what it occupies
        # Each node's total resources as last seen alive: Ray reports a dead node's as empty
        # (a node lost under a trial held nothing then, and its retry "never fit").
        self._node_totals: dict[str, dict[str, float]] = {}
        self._evaluations: dict[int, ObjectRef] = {}
        self._dispatcher: ActorHandle | None = None
        self._lost: dict[AttemptRef, AttemptError] = {}  # lost with a dispatcher that died
        # node id → (the node, its preflight task, monotonic deadline, the timeout)
        self._preflights: dict[str, tuple[ClusterNode, ObjectRef, float, float]] = {}
        self._preflight_task: RemoteFunction | None = None

    # -------------------------------------------------------------- lifecycle

    @property
    def started(self) -> bool:
        return self._dispatcher is not None

    def start(self) -> None:
        """Connect to Ray (or start a local instance) and find or create the dispatcher."""
        if self._dispatcher is not None:
            return
        if self.address:  # Ray 2.5x clusters use token auth; Ray reads this on import
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        import ray

        runtime_env = {"env_vars": self.env} if self.env else None
        before: set[int] | None = None  # a local Ray's: the processes that were there before
        try:
            if self.address:
                ray.init(address=self.address, namespace=self.namespace, runtime_env=runtime_env)
            else:
                if self.session_file is not None:
                    local_ray.reap_leftovers(self.session_file)
                before = {p.pid for p in local_ray.descendants()}
                with local_ray.scrubbed_environ() as removed:
                    ray.init(
                        address="local",
                        namespace=self.namespace,
                        include_dashboard=False,
                        num_cpus=self.num_cpus,
                        num_gpus=self.num_gpus,
                        object_store_memory=self.object_store_mb * 1024 * 1024,
                        runtime_env=runtime_env,
                        configure_logging=False,
                    )
                log.info("started a local Ray without %s in its environment", ", ".join(removed))
                self._record_session()
            self._dispatcher = self._find_dispatcher()
        except BaseException:
            self._abandon_start(before)
            raise
        log.info("connected to Ray (namespace %s): %s", self.namespace, ray.cluster_resources())

    def _abandon_start(self, before: set[int] | None) -> None:
        """Undo a start that failed half-way, so that the next one begins afresh: disconnect
        and, for a local Ray, end the processes it started (a ``ray.init`` that fails, say a
        raylet that never registers, leaves its GCS and agent processes running: a scheduler
        retrying it would pile them up)."""
        import ray

        with contextlib.suppress(Exception):
            ray.shutdown()
        if before is not None:
            local_ray.reap([p for p in local_ray.descendants() if p.pid not in before])
            if self.session_file is not None:
                self.session_file.unlink(missing_ok=True)

    def shutdown(self) -> None:
        """Disconnect. On a local instance that ends every attempt; on a cluster they go on
        and the next control plane re-adopts them."""
        import ray

        if self._dispatcher is None:
            return
        started = [] if self.address else local_ray.descendants()
        ray.shutdown()
        self._dispatcher = None
        self._tracked.clear()
        self._lost.clear()
        self._evaluations.clear()
        self._preflights.clear()
        self._preflight_task = None
        local_ray.reap(started)  # Ray leaves its agent processes behind when the local raylet exits
        if self.session_file is not None:
            self.session_file.unlink(missing_ok=True)

    def _record_session(self) -> None:
        if self.session_file is not None:
            with contextlib.suppress(OSError):
                local_ray.record(self.session_file)

    # ---------------------------------------------------------------- attempts

    def launch(self, launch: AttemptLaunch) -> None:
        """Start an attempt; the dispatcher cancels any other attempt of the trial first. If
        the dispatcher has died, a new one is started and takes the launch."""
        import ray
        from ray.exceptions import RayActorError

        for other in [ref for ref in self._tracked if ref.trial_id == launch.trial_id]:
            if other != launch.ref:
                self.cancel(other)
        if self.socket_ifname and not launch.socket_ifname:
            launch = replace(launch, socket_ifname=self.socket_ifname)
        if self.storage_env and not launch.storage_env:
            launch = replace(launch, storage_env=self.storage_env)
        try:
            ray.get(self._actor().start.remote(launch), timeout=60)
        except RayActorError as exc:  # the dispatcher died: launch on a new one instead
            self._dispatcher_died(exc)
            ray.get(self._actor().start.remote(launch), timeout=60)
        self._tracked[launch.ref] = launch.needs
        self._record_session()  # worker processes started since

    def adopt(self, ref: AttemptRef, needs: ClusterResources) -> bool:
        """Track an attempt a previous control plane launched, if Ray still runs it."""
        import ray
        from ray.exceptions import RayActorError

        try:
            known = ray.get(self._actor().status.remote([ref]), timeout=60)[ref]
        except RayActorError as exc:  # the dispatcher died, and the attempt with it
            self._dispatcher_died(exc)
            return False
        if known is None:
            return False
        self._tracked[ref] = dict(needs)
        return True

    def statuses(self) -> list[AttemptStatus]:
        """The status of every tracked attempt (one round trip to the dispatcher)."""
        import ray
        from ray.exceptions import RayActorError

        if not self._tracked:
            return []
        refs = list(self._tracked)
        found: dict[AttemptRef, AttemptStatus | None] = {}
        if len(self._lost) < len(refs):
            try:
                found = ray.get(self._actor().status.remote(refs), timeout=60)
            except RayActorError as exc:  # it died: every attempt it ran is lost
                self._dispatcher_died(exc)
            except Exception as exc:  # unreachable: every attempt is lost with it
                error = _lost(f"the Ray dispatcher was lost: {type(exc).__name__}", str(exc))
                return [AttemptStatus(ref, AttemptState.LOST, error=error) for ref in refs]
        return [
            _lost_status(ref, self._lost.get(ref)) or found.get(ref) or _unknown(ref)
            for ref in refs
        ]

    def release(self, ref: AttemptRef) -> None:
        """Forget an attempt that ended."""
        self._lost.pop(ref, None)
        if self._tracked.pop(ref, None) is not None and self._dispatcher is not None:
            self._dispatcher.forget.remote(ref)

    def cancel(self, ref: AttemptRef) -> None:
        """Stop an attempt now: its rank processes are killed and its resources freed."""
        import ray

        if ref not in self._tracked:
            return
        with contextlib.suppress(Exception):
            ray.get(self._actor().cancel.remote(ref), timeout=30)
        self.release(ref)

    def free(self, pending: Sequence[AttemptRef]) -> dict[str, float]:
        """Cluster resources not yet claimed, minus what pending attempts will claim."""
        import ray

        free = dict(ray.available_resources())
        for ref in pending:
            for key, amount in self._tracked.get(ref, {}).items():
                free[key] = free.get(key, 0.0) - amount
        return free

    def nodes(self) -> list[ClusterNode]:
        """Every node in Ray's node table with its total resources; nodes that are down are
        reported too (``alive=False``) while Ray remembers them, with the totals they had
        when this executor last saw them up (Ray's own are empty then)."""
        import ray

        found = []
        for node in ray.nodes():
            node_id = str(node.get("NodeID", ""))
            totals = {k: float(v) for k, v in (node.get("Resources") or {}).items()}
            if totals:
                self._node_totals[node_id] = totals
            else:
                totals = dict(self._node_totals.get(node_id, {}))
            found.append(
                ClusterNode(
                    node_id=node_id,
                    node_ip=str(node.get("NodeManagerAddress", "")),
                    resources=totals,
                    alive=bool(node.get("Alive")),
                )
            )
        return found

    # ------------------------------------------------------------- evaluations

    def evaluate(self, request: EvaluationRequest) -> None:
        """Compute test metrics of a checkpoint in one Ray task (see ``evaluations``)."""
        import ray

        from hpo.workers.runner import run_evaluation

        task = ray.remote(run_evaluation).options(
            num_cpus=request.cpus, num_gpus=min(request.gpus, 1), max_retries=1
        )
        self._evaluations[request.trial_id] = task.remote(
            request.trainable,
            dict(request.config),
            dict(request.params),
            request.checkpoint,
            request.gpus > 0,
            self.storage_env,
        )

    def evaluations(self) -> list[EvaluationResult]:
        """Evaluations that ended since the last call."""
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
                out.append(EvaluationResult(trial_id, metrics=ray.get(ref)))
            except Exception as exc:
                error = f"{type(exc).__name__}: {str(exc)[-500:]}"
                out.append(EvaluationResult(trial_id, error=error))
        return out

    # --------------------------------------------------------------- preflight

    def preflight(self, node: ClusterNode, request: PreflightRequest) -> None:
        """Run :func:`hpo.workers.preflight.run_preflight` in a task pinned to ``node``
        (``soft=False``: it runs there or nowhere) that needs no CPU."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from hpo.workers.preflight import run_preflight

        old = self._preflights.pop(node.node_id, None)
        if old is not None:
            with contextlib.suppress(Exception):
                ray.cancel(old[1], force=True)
        if self._preflight_task is None:  # made (and exported to the cluster) once
            self._preflight_task = ray.remote(run_preflight)
        task = self._preflight_task.options(
            num_cpus=0,
            max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
            name=f"hpo-preflight-{node.node_id[:12]}",
        )
        ref = task.remote(request, node.node_id, node.node_ip, self.storage_env)
        deadline = time.monotonic() + request.timeout_s
        self._preflights[node.node_id] = (node, ref, deadline, request.timeout_s)

    def preflights(self) -> list[NodePreflight]:
        """Preflights that ended since the last call; overdue ones are cancelled and reported
        as ``schedule`` failures."""
        import ray

        if not self._preflights:
            return []
        refs = [ref for _, ref, _, _ in self._preflights.values()]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        finished = set(done)
        now = time.monotonic()
        out = []
        for node_id, (node, ref, deadline, timeout_s) in list(self._preflights.items()):
            if ref in finished:
                try:
                    out.append(ray.get(ref, timeout=5))
                except Exception as exc:  # the task itself failed (node died, worker crashed)
                    why = f"the preflight task failed: {type(exc).__name__}: {str(exc)[-300:]}"
                    out.append(_preflight_failed(node, why, PREFLIGHT_TASK))
            elif now >= deadline:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
                why = f"node {node_id} did not run the preflight within {timeout_s:g} s"
                out.append(_preflight_failed(node, why, PREFLIGHT_SCHEDULE))
            else:
                continue
            del self._preflights[node_id]
        return out

    # -------------------------------------------------------------- dispatcher

    def _find_dispatcher(self) -> ActorHandle:
        """This deployment's dispatcher: the running one, or a new one if there is none."""
        from hpo.workers.runner import TrialDispatcher

        return TrialDispatcher.options(
            name=dispatcher_name(self.deployment),
            namespace=self.namespace,
            lifetime="detached",
            get_if_exists=True,
        ).remote(self.deployment)

    def _dispatcher_died(self, exc: Exception) -> None:
        """Note that every tracked attempt was lost with the dispatcher (each is reported
        ``lost`` with an infrastructure error by the next :meth:`statuses`, so it is retried
        without spending ``max_retries``) and start a new dispatcher. Raises if Ray cannot
        create one (the cluster itself is gone)."""
        error = _lost(f"the Ray dispatcher died: {type(exc).__name__}", str(exc))
        lost = [ref for ref in self._tracked if ref not in self._lost]
        self._lost.update(dict.fromkeys(lost, error))
        log.warning("the Ray dispatcher died; starting a new one (%d attempt(s) lost)", len(lost))
        self._dispatcher = self._find_dispatcher()

    def _actor(self) -> ActorHandle:
        if self._dispatcher is None:
            raise RuntimeError("the Ray executor is not started")
        return self._dispatcher


def _preflight_failed(node: ClusterNode, why: str, check: str) -> NodePreflight:
    return NodePreflight(node.node_id, node.node_ip, {check: why}, time.time())


def _lost(message: str, detail: str = "") -> AttemptError:
    return AttemptError(
        kind="Lost",
        message=message,
        retryable=True,
        traceback=detail[-2000:],
        failure_class=FailureClass.INFRASTRUCTURE,
    )


def _lost_status(ref: AttemptRef, error: AttemptError | None) -> AttemptStatus | None:
    return None if error is None else AttemptStatus(ref, AttemptState.LOST, error=error)


def _unknown(ref: AttemptRef) -> AttemptStatus:
    error = _lost(f"the dispatcher does not know attempt {ref}")
    return AttemptStatus(ref, AttemptState.LOST, error=error)


def namespace_of(deployment: str | None) -> str:
    """The Ray namespace of a deployment: ``HPO_RAY_NAMESPACE`` when set, else
    ``hpo-<deployment id>`` (``hpo`` without one)."""
    explicit = os.environ.get("HPO_RAY_NAMESPACE")
    if explicit:
        return explicit
    return f"hpo-{deployment}" if deployment else "hpo"


def dispatcher_name(deployment: str | None) -> str:
    """The dispatcher actor's name for a deployment; it carries the deployment id, so two
    deployments stay apart even when ``HPO_RAY_NAMESPACE`` gives them one namespace. (Imports
    Ray: call it only once Ray's settings are in the environment, as ``start`` does.)"""
    from hpo.workers.runner import DISPATCHER

    return f"{DISPATCHER}-{deployment}" if deployment else DISPATCHER
