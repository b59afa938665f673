"""An :class:`~hpo.service.executor.Executor` in memory, for scheduler tests without Ray.

Attempts do nothing by themselves: a test places, checkpoints, finishes, fails or loses them.
``cluster`` stands for what the cluster runs (it outlives ``shutdown``, as a shared Ray cluster
does, so a second scheduler can adopt from it); ``tracked`` is what this executor follows.
Every launch checks the protocol's promise that two attempts of one trial never run together.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hpo.service.executor import (
    PREFLIGHT_SCHEDULE,
    AttemptError,
    AttemptLaunch,
    AttemptRef,
    AttemptResult,
    AttemptState,
    AttemptStatus,
    Checkpoint,
    ClusterNode,
    ClusterResources,
    EvaluationRequest,
    EvaluationResult,
    FailureClass,
    NodePreflight,
    PreflightRequest,
    RankPlacement,
)


@dataclass
class FakeCluster:
    """What the pretend cluster runs: attempts by ref, with what each occupies. ``nodes``
    splits ``capacity`` into nodes (default: one node holding all of it); with
    ``nodes_unknown`` the cluster cannot say what its nodes are."""

    capacity: dict[str, float] = field(default_factory=lambda: {"CPU": 4.0})
    nodes: list[ClusterNode] | None = None
    nodes_unknown: bool = False
    attempts: dict[AttemptRef, AttemptStatus] = field(default_factory=dict)
    needs: dict[AttemptRef, dict[str, float]] = field(default_factory=dict)
    # what a node's preflight finds wrong (check → message); a node in ``stuck`` never runs it
    broken: dict[str, dict[str, str]] = field(default_factory=dict)
    stuck: set[str] = field(default_factory=set)
    # how far a node's clock runs ahead of the control plane's (it stamps its own checked_at)
    clock_ahead_s: dict[str, float] = field(default_factory=dict)

    def live(self, trial_id: int | None = None) -> list[AttemptRef]:
        """Attempts that have not ended (of one trial, if given)."""
        return [
            ref
            for ref, status in self.attempts.items()
            if not status.state.ended and trial_id in (None, ref.trial_id)
        ]


class FakeExecutor:
    """Implements the Executor protocol in memory; see the module docstring."""

    name = "fake"

    def __init__(self, cluster: FakeCluster | None = None) -> None:
        self.cluster = cluster or FakeCluster()
        self.tracked: set[AttemptRef] = set()
        self.launched: list[AttemptRef] = []
        self.launch_of: dict[AttemptRef, AttemptLaunch] = {}  # what each launch carried
        self.cancelled: list[AttemptRef] = []
        self.requests: list[EvaluationRequest] = []
        self.evaluated: list[EvaluationResult] = []
        self._started = False
        self.preflighted: list[str] = []  # node ids, in the order their preflight started
        self._preflights: dict[str, tuple[ClusterNode, PreflightRequest, float]] = {}

    # ------------------------------------------------------------ the protocol

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        self._started = True

    def shutdown(self) -> None:
        self._started = False
        self.tracked.clear()

    def launch(self, launch: AttemptLaunch) -> None:
        for other in self.cluster.live(launch.trial_id):
            if other != launch.ref:
                self._end(other, AttemptState.CANCELLED)
                self.cancelled.append(other)
        assert not self.cluster.live(launch.trial_id), "two attempts of one trial at once"
        if launch.ref not in self.cluster.attempts:
            self.cluster.attempts[launch.ref] = AttemptStatus(launch.ref, AttemptState.PENDING)
            self.cluster.needs[launch.ref] = launch.needs
            self.launched.append(launch.ref)
            self.launch_of[launch.ref] = launch
        self.tracked.add(launch.ref)

    def adopt(self, ref: AttemptRef, needs: ClusterResources) -> bool:
        if ref not in self.cluster.attempts:
            return False
        self.tracked.add(ref)
        return True

    def statuses(self) -> list[AttemptStatus]:
        lost = AttemptError(
            "Lost", "the cluster does not know it", failure_class=FailureClass.INFRASTRUCTURE
        )
        return [
            self.cluster.attempts.get(ref) or AttemptStatus(ref, AttemptState.LOST, error=lost)
            for ref in sorted(self.tracked)
        ]

    def release(self, ref: AttemptRef) -> None:
        self.tracked.discard(ref)

    def cancel(self, ref: AttemptRef) -> None:
        if ref not in self.tracked:
            return
        if ref in self.cluster.live():
            self._end(ref, AttemptState.CANCELLED)
        self.cancelled.append(ref)
        self.tracked.discard(ref)

    def free(self, pending: Sequence[AttemptRef]) -> dict[str, float]:
        free = dict(self.cluster.capacity)
        placed = [r for r in self.cluster.live() if self._state(r) == AttemptState.RUNNING]
        for ref in [*placed, *pending]:
            for key, amount in self.cluster.needs.get(ref, {}).items():
                free[key] = free.get(key, 0.0) - amount
        return free

    def nodes(self) -> list[ClusterNode]:
        if self.cluster.nodes_unknown:
            raise RuntimeError("the node table cannot be read")
        if self.cluster.nodes is None:
            return [ClusterNode("node-1", "10.0.0.1", dict(self.cluster.capacity))]
        return list(self.cluster.nodes)

    def evaluate(self, request: EvaluationRequest) -> None:
        self.requests.append(request)

    def evaluations(self) -> list[EvaluationResult]:
        out, self.evaluated = self.evaluated, []
        return out

    def preflight(self, node: ClusterNode, request: PreflightRequest) -> None:
        self.preflighted.append(node.node_id)
        self._preflights[node.node_id] = (node, request, time.monotonic() + request.timeout_s)

    def preflights(self) -> list[NodePreflight]:
        out = []
        for node_id, (node, request, deadline) in list(self._preflights.items()):
            if node_id in self.cluster.stuck:
                if time.monotonic() < deadline:
                    continue
                why = f"node {node_id} did not run the preflight within {request.timeout_s:g} s"
                failures = {PREFLIGHT_SCHEDULE: why}
            else:
                failures = dict(self.cluster.broken.get(node_id, {}))
            ahead = self.cluster.clock_ahead_s.get(node_id, 0.0)
            out.append(NodePreflight(node_id, node.node_ip, failures, time.time() + ahead))
            del self._preflights[node_id]
        return out

    # ------------------------------------------------------ what tests call

    def place(self, ref: AttemptRef, workers: int = 1) -> None:
        """The attempt got its resources and every rank started."""
        ranks = [_rank(r) for r in range(workers)]
        self._set(ref, state=AttemptState.RUNNING, placements=ranks)

    def checkpoint(self, ref: AttemptRef, path: str, step: int) -> None:
        self._set(ref, checkpoint=Checkpoint(path, step))

    def finish(
        self, ref: AttemptRef, *, unsent: Sequence[dict[str, Any]] = (), **last: float
    ) -> None:
        """The attempt ended with these last values of its metrics (and ``unsent``: points
        its reporter could not deliver)."""
        result = AttemptResult(last=last, best=last, unsent=list(unsent))
        self._set(ref, state=AttemptState.DONE, result=result)

    def fail(self, ref: AttemptRef, error: AttemptError) -> None:
        self._set(ref, state=AttemptState.FAILED, error=error)

    def lose(self, ref: AttemptRef) -> None:
        """The cluster forgets the attempt (its supervisor or node went away)."""
        del self.cluster.attempts[ref]

    def _state(self, ref: AttemptRef) -> AttemptState:
        return self.cluster.attempts[ref].state

    def _end(self, ref: AttemptRef, state: AttemptState) -> None:
        self._set(ref, state=state)

    def _set(self, ref: AttemptRef, **changes: object) -> None:
        self.cluster.attempts[ref] = replace(self.cluster.attempts[ref], **changes)


def _rank(rank: int) -> RankPlacement:
    return RankPlacement(
        rank=rank,
        node_ip="10.0.0.1",
        node_id="node-1",
        hostname="fake",
        pid=1000 + rank,
        device="cpu",
        gpu_ids=[],
        cuda_visible_devices=None,
        device_name=None,
        started_at=time.time(),
    )
