"""Whether a trial's ranks can ever be placed on the cluster's nodes, and the node snapshot every
replica reads to answer that at study creation.

A trial runs ``workers_per_trial`` ranks, each one bundle of ``cpus_per_worker`` CPUs (and
``gpus_per_worker`` GPUs) that must sit on a single node. Comparing with the cluster's total
free resources says nothing about that: a 2-CPU rank never fits two 1-CPU nodes, and Ray would
keep its placement group pending forever. So:

- a rank that fits no node's *total* is refused: HTTP 422 naming the field when the study is
  created and the cluster is known (:func:`check_spec`), else the scheduler fails the trial
  as ``deterministic`` with the same reason (:func:`placement_problem`);
- a rank that fits a node's total, but not what is free now, waits (the usual case);
- a node that is down still counts while the cluster remembers it (it may come back: a trial
  whose rank fits only that node waits for it rather than failing).

The scheduler's leader stores a compact snapshot of the nodes in the database (``meta`` table,
:func:`store_snapshot`) with its time; an API replica trusts it for :data:`SNAPSHOT_MAX_AGE_S`
and accepts every spec when it is older or missing (the scheduler then has the last word).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from hpo.service.errors import InvalidInput
from hpo.service.executor import ClusterNode
from hpo.service.spec import Resources, StudySpec
from hpo.service.storage import meta
from hpo.service.storage.session import Transactions

log = logging.getLogger("hpo.placement")

SNAPSHOT_KEY = "cluster_nodes"
# The leader rewrites the snapshot when the nodes change and at least this often ...
SNAPSHOT_REFRESH_S = 30.0
# ... and a replica trusts one no older than this (clock skew between servers included).
SNAPSHOT_MAX_AGE_S = 120.0
_EPS = 1e-9


@dataclass(frozen=True)
class Problem:
    """Why a trial's ranks can never be placed: the spec field at fault and the reason."""

    field: str
    message: str


def rank_slots(node: dict[str, float], cpus: float, gpus: float) -> int:
    """How many ranks of ``cpus`` CPUs and ``gpus`` GPUs a node's total resources hold."""
    slots = math.floor((node.get("CPU", 0.0) + _EPS) / cpus) if cpus > 0 else 1 << 30
    if gpus > 0:
        slots = min(slots, math.floor((node.get("GPU", 0.0) + _EPS) / gpus))
    return max(0, slots)


def placement_problem(resources: Resources, nodes: Sequence[ClusterNode]) -> Problem | None:
    """None when the trial's ranks fit the nodes' totals (all at once, one node each); else
    the field at fault and why. No nodes known: None (nothing to judge by).

    The ranks are identical bundles, so the nodes hold ``sum(rank_slots)`` of them at most:
    exact, not a bin-packing guess."""
    if not nodes:
        return None
    cpus, gpus = resources.cpus_per_worker, resources.gpus_per_worker
    workers = resources.workers_per_trial
    slots = sum(rank_slots(n.resources, cpus, gpus) for n in nodes)
    if slots >= workers:
        return None
    count = f"{len(nodes)} node(s)"
    largest_cpu = max(n.resources.get("CPU", 0.0) for n in nodes)
    largest_gpu = max(n.resources.get("GPU", 0.0) for n in nodes)
    if slots == 0 and cpus > largest_cpu + _EPS:
        return Problem(
            "resources.cpus_per_worker",
            f"resources.cpus_per_worker: a rank needs {cpus:g} CPU(s) on one node, but no node "
            f"of the cluster has that many (the largest of its {count} has {largest_cpu:g})",
        )
    if slots == 0 and gpus > largest_gpu + _EPS:
        return Problem(
            "resources.gpus_per_worker",
            f"resources.gpus_per_worker: a rank needs {gpus:g} GPU(s) on one node, but no node "
            f"of the cluster has that many (the largest of its {count} has {largest_gpu:g})",
        )
    if slots == 0:
        return Problem(
            "resources",
            f"resources: a rank needs {cpus:g} CPU(s) and {gpus:g} GPU(s) on one node, but no "
            f"node of the cluster's {count} has both",
        )
    return Problem(
        "resources.workers_per_trial",
        f"resources.workers_per_trial: {workers} ranks of {cpus:g} CPU(s)"
        + (f" and {gpus:g} GPU(s)" if gpus else "")
        + f" each never fit: the cluster's {count} hold at most {slots} such ranks",
    )


def fingerprint(nodes: Sequence[ClusterNode]) -> tuple:
    """What placement judgements depend on: the multiset of node shapes (CPUs, GPUs)."""
    return tuple(sorted(Counter(_shape(n) for n in nodes).items()))


def _shape(node: ClusterNode) -> tuple[float, float]:
    return (round(node.resources.get("CPU", 0.0), 3), round(node.resources.get("GPU", 0.0), 3))


# ------------------------------------------------------------------ the shared snapshot


def encode(nodes: Sequence[ClusterNode], at: float) -> str:
    """The snapshot as stored: its time and the node shapes with their counts."""
    shapes = [[cpu, gpu, n] for (cpu, gpu), n in fingerprint(nodes)]
    return json.dumps({"at": round(at, 3), "shapes": shapes}, separators=(",", ":"))


def decode(text: str | None, *, now: float | None = None) -> list[ClusterNode] | None:
    """The nodes of a stored snapshot, or None when there is none, it is unreadable, or it is
    older than :data:`SNAPSHOT_MAX_AGE_S`."""
    if not text:
        return None
    try:
        data = json.loads(text)
        if (now or time.time()) - float(data["at"]) > SNAPSHOT_MAX_AGE_S:
            return None
        return [
            ClusterNode("", "", {"CPU": float(cpu), "GPU": float(gpu)})
            for cpu, gpu, n in data["shapes"]
            for _ in range(int(n))
        ]
    except (ValueError, KeyError, TypeError):
        return None


def store_snapshot(storage: Transactions, nodes: Sequence[ClusterNode] | None) -> None:
    """Publish the nodes (None: the cluster is unknown) for every replica. Raises
    DatabaseUnavailable."""
    meta.put(storage, SNAPSHOT_KEY, encode(nodes, time.time()) if nodes else None)


def known_nodes(storage: Transactions) -> list[ClusterNode] | None:
    """The nodes of the leader's latest snapshot, or None when unknown or stale. Raises
    DatabaseUnavailable."""
    return decode(meta.get(storage, SNAPSHOT_KEY))


def check_spec(storage: Transactions, spec: StudySpec) -> None:
    """Refuse (InvalidInput naming the field) a dispatched study whose ranks fit no node of
    the cluster as last seen; accept when the cluster is unknown or the study is ask/tell."""
    if spec.trainable is None:
        return
    problem = placement_problem(spec.resources, known_nodes(storage) or [])
    if problem is not None:
        raise InvalidInput(problem.message, field=problem.field)
