"""Checks that a cluster can run trials before it is asked to: the node preflight and the
start-up warnings.

:class:`ClusterPreflight` runs in the scheduler's thread of the server that holds the scheduler
lease. On a cluster (``HPO_RAY_ADDRESS``) it starts the node preflight
(:mod:`hpo.workers.preflight`: write and read the checkpoint storage, reach the control plane)
on every alive node, again on every node that joins later, and again on a failed node every
``recheck_s`` (so a fixed mount clears the failure without a restart). Results are kept per
node and written to the database's ``meta`` table whenever they change, so every replica's
``/healthz`` reports the same (a standby replica runs no preflight of its own). A failure is
logged as an ERROR naming the node and the check. Everything it does in a tick is
non-blocking: the executor's tasks run on the cluster, and the node list is the one the
scheduler reads for placement (:meth:`ClusterPreflight.step` takes it).

:func:`config_warnings` says what in the settings will break a cluster although every check
passes on one host (node-local checkpoints, workers posting to their own loopback).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from hpo.service.errors import DatabaseUnavailable
from hpo.service.executor import ClusterNode, Executor, NodePreflight, PreflightRequest
from hpo.service.settings import Settings
from hpo.service.storage import meta
from hpo.service.storage.session import Transactions
from hpo.workers.storage import StorageError, mark

log = logging.getLogger("hpo.preflight")

OK, FAILED, PENDING, OFF = "ok", "failed", "pending", "off"
MARK_TIMEOUT_S = 10.0  # writing the shared-storage marker (the lease is kept meanwhile)


class ClusterPreflight:
    """The node preflight as the scheduler drives it; ``request`` None turns it off (a local
    Ray), and then the server that takes the lease removes any report an earlier
    configuration left in the database."""

    def __init__(
        self,
        storage: Transactions,
        request: PreflightRequest | None,
        *,
        recheck_s: float = 60.0,
    ) -> None:
        self.storage = storage
        self.request = request
        self.recheck_s = recheck_s
        self._nodes: dict[str, ClusterNode] = {}  # alive at the last scan
        self._results: dict[str, NodePreflight] = {}
        # monotonic time each result arrived: the recheck is timed by this server's clock, not
        # by the node's checked_at (a node's clock may run ahead of ours)
        self._received: dict[str, float] = {}
        self._running: set[str] = set()  # node ids whose preflight is under way
        self._cluster_error: str | None = None
        self._storage_error: str | None = None  # this server cannot write the storage
        self._marked_at = 0.0  # when the marker was last written (or tried)
        self._dirty = False  # the stored report is behind

    @property
    def enabled(self) -> bool:
        return self.request is not None

    def reset(self) -> None:
        """This server just took the scheduler lease: start over (every node is checked
        again) and replace the stored report."""
        self._forget_nodes()
        self._cluster_error = None
        self._dirty = True
        self._mark_storage()
        self._store()

    def _mark_storage(self) -> None:
        """Write a fresh marker into the checkpoint storage; each node's preflight reads it
        back, so a node whose storage path is a folder of its own fails (the checkpoints it
        writes would be invisible to every other node and to downloads)."""
        if self.request is None:
            return
        marker = f"control-plane-{self.request.deployment or 'default'}"
        self._marked_at = time.monotonic()
        try:
            content = mark(self.request.storage_root, marker, timeout_s=MARK_TIMEOUT_S)
        except StorageError as exc:
            self._storage_error = f"this control plane cannot write the checkpoint storage: {exc}"
            log.error("preflight: %s", self._storage_error)
            self.request = replace(self.request, shared_marker=None)
            return
        self._storage_error = None
        self.request = replace(self.request, shared_marker=(marker, content))

    @property
    def mark_due(self) -> bool:
        """Whether writing the marker failed ``recheck_s`` ago or more (see :meth:`remark`)."""
        return bool(self._storage_error) and time.monotonic() - self._marked_at >= self.recheck_s

    def remark(self) -> None:
        """Try the marker again, like a failed node is checked again, so a storage that is
        back clears the failure without a restart or a new leader; every node is then
        checked again against the marker. May take up to MARK_TIMEOUT_S (the caller keeps
        its lease meanwhile)."""
        self._mark_storage()
        if self._storage_error is None:
            log.info("preflight: this control plane writes the checkpoint storage again")
            # Start over as a new leader does: results of preflights started without the
            # marker (some still under way) must not stand.
            self._forget_nodes()
        self._dirty = True
        self._store()

    def _forget_nodes(self) -> None:
        """Drop every node, result and preflight under way: each node is checked afresh."""
        self._nodes.clear()
        self._results.clear()
        self._received.clear()
        self._running.clear()

    def cluster_failed(self, error: Exception) -> None:
        """The cluster could not be reached at all (``executor.start`` raised)."""
        message = f"cannot connect to the Ray cluster: {type(error).__name__}: {error}"
        if message != self._cluster_error:
            log.error("preflight: %s", message)
            self._cluster_error, self._dirty = message, True
        self._store()

    def step(self, executor: Executor, nodes: Sequence[ClusterNode] | None) -> None:
        """Collect preflights that ended; start one on each node of ``nodes`` (the scheduler's
        latest read of the cluster, None when it could not be read) that joined or failed
        ``recheck_s`` ago, and forget nodes that left. Store the report if it changed."""
        if self.request is None:
            return
        for result in executor.preflights():
            self._running.discard(result.node_id)
            if result.node_id not in self._nodes:
                continue  # the node left meanwhile
            before = self._results.get(result.node_id)
            self._results[result.node_id] = result
            self._received[result.node_id] = time.monotonic()
            if not result.ok:
                log.error("preflight failed: %s", result.describe())
            elif before is None or not before.ok:
                log.info("preflight: %s", result.describe())
            self._dirty = True
        if nodes is not None:
            self._scan(executor, nodes)
        self._store()

    def report(self) -> dict[str, Any]:
        """The report ``/healthz`` shows: ``state`` (ok, failed, pending), the cluster error if
        it could not be reached, and each alive node's outcome."""
        nodes = []
        for node_id, node in sorted(self._nodes.items()):
            result = self._results.get(node_id)
            if result is None:
                nodes.append({"node_id": node_id, "node_ip": node.node_ip, "state": PENDING})
                continue
            nodes.append(
                {
                    "node_id": node_id,
                    "node_ip": result.node_ip,
                    "state": OK if result.ok else FAILED,
                    "failures": dict(result.failures),
                    "checked_at": result.checked_at,
                }
            )
        if self._cluster_error or self._storage_error or any(n["state"] == FAILED for n in nodes):
            state = FAILED
        elif not nodes or any(n["state"] == PENDING for n in nodes):
            state = PENDING
        else:
            state = OK
        return {
            "state": state,
            "cluster_error": self._cluster_error,
            "storage_error": self._storage_error,
            "nodes": nodes,
            "updated_at": time.time(),
        }

    def _scan(self, executor: Executor, nodes: Sequence[ClusterNode]) -> None:
        assert self.request is not None
        alive = {node.node_id: node for node in nodes if node.alive}
        if self._cluster_error is not None:
            self._cluster_error, self._dirty = None, True
        for gone in set(self._nodes) - set(alive):
            log.info("preflight: node %s left the cluster", gone)
            self._results.pop(gone, None)
            self._received.pop(gone, None)
            self._running.discard(gone)
            self._dirty = True
        for node_id, node in alive.items():
            if node_id in self._running:
                continue
            result = self._results.get(node_id)
            received = self._received.get(node_id, -math.inf)
            if result is None or (not result.ok and time.monotonic() - received >= self.recheck_s):
                if node_id not in self._nodes:
                    log.info("preflight: checking node %s (%s)", node_id, node.node_ip)
                executor.preflight(node, self.request)
                self._running.add(node_id)
                self._dirty = self._dirty or result is None
        self._nodes = alive

    def _store(self) -> None:
        if not self._dirty:
            return
        try:
            meta.store_preflight(self.storage, self.report() if self.enabled else None)
        except DatabaseUnavailable:  # kept dirty: the next step stores it
            log.warning("could not store the preflight report; retrying", exc_info=True)
            return
        self._dirty = False


def config_warnings(settings: Settings) -> list[str]:
    """What in ``settings`` breaks a cluster even when every check passes on one host."""
    if not settings.ray_address:
        return []
    out = []
    if settings.storage_path is None:
        out.append(
            f"HPO_RAY_ADDRESS is set without HPO_STORAGE_PATH: checkpoints go to "
            f"{settings.checkpoint_dir}, a folder local to each node (retries and downloads "
            "then miss them); set HPO_STORAGE_PATH to storage every node and this server share"
        )
    if not settings.public_url:
        out.append(
            f"HPO_RAY_ADDRESS is set without HPO_PUBLIC_URL: workers post metrics to "
            f"{settings.worker_api_url}, which on another node is that node itself; set "
            "HPO_PUBLIC_URL to an address of this server that every node reaches"
        )
    return out


def failure_lines(report: dict[str, Any]) -> list[dict[str, str]]:
    """One entry per failed check of a stored report: node id, node ip, check, message."""
    out = []
    if report.get("cluster_error"):
        out.append(
            {"node_id": "", "node_ip": "", "check": "cluster", "message": report["cluster_error"]}
        )
    if report.get("storage_error"):
        out.append(
            {"node_id": "", "node_ip": "", "check": "storage", "message": report["storage_error"]}
        )
    for node in report.get("nodes", []):
        for check, why in (node.get("failures") or {}).items():
            out.append(
                {
                    "node_id": node["node_id"],
                    "node_ip": node["node_ip"],
                    "check": check,
                    "message": why,
                }
            )
    return out
