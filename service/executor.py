"""The seam between the scheduler and whatever runs trials: the :class:`Executor` protocol and
the typed records that cross it.

The scheduler decides what runs and talks to an ``Executor`` only; :class:`RayExecutor`
(``hpo.service.ray_executor``) implements it on Ray, and tests use an in-memory one. The
records are plain dataclasses with no Ray or torch in them, so the worker side
(``hpo.workers.runner``) builds and returns the same records.

An *attempt* is one run of a trial: a trial that is retried has attempts 1, 2, ... and every
record is keyed by :class:`AttemptRef` (trial id, attempt), never by the trial alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, TypeAlias

JsonValue: TypeAlias = str | int | float | bool | list["JsonValue"] | dict[str, "JsonValue"] | None
# Cluster resources by name ("CPU", "GPU", custom ones), as amounts.
ClusterResources: TypeAlias = Mapping[str, float]


@dataclass(frozen=True, order=True)
class AttemptRef:
    """One attempt of one trial: the key of everything the executor tracks."""

    trial_id: int
    attempt: int

    def __str__(self) -> str:
        return f"{self.trial_id}/{self.attempt}"


@dataclass(frozen=True)
class AttemptLaunch:
    """Everything the workers need to run one attempt of a trial (no database access)."""

    trial_id: int
    study_id: int
    number: int
    attempt: int
    trainable: str
    config: dict[str, JsonValue]
    params: dict[str, JsonValue]
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    api_url: str
    token: str | None
    objectives: list[tuple[str, str]]  # (metric, "minimize" | "maximize")
    keep_metrics: list[str]
    checkpoint_dir: str  # the trial's folder; each attempt writes under attempt-<n>/
    lease_s: float = 300.0
    # The network interface gloo/NCCL bind to (``HPO_SOCKET_IFNAME``); None: the one that
    # holds the rank's node address (see ``hpo.workers.ddp.network_env``).
    socket_ifname: str | None = None
    # What the ranks need to reach an object store (``HPO_STORAGE_OPTIONS``, ``AWS_*``): handed
    # over with the launch and set by each rank, never in Ray's runtime_env, whose env_vars Ray
    # writes in plain text to every node's runtime_env_agent.log.
    storage_env: dict[str, str] = field(default_factory=dict, repr=False)
    # The checkpoint this attempt must resume from (a promoted trial's, saved when it
    # paused); None: the newest readable one of the trial's earlier attempts, if any.
    resume_from: str | None = None
    # Where rank 0 writes the trial's points as live TensorBoard scalars (the trial's run
    # folder under ``HPO_TENSORBOARD_DIR``); None: nowhere.
    tensorboard_dir: str | None = None

    @property
    def ref(self) -> AttemptRef:
        return AttemptRef(self.trial_id, self.attempt)

    @property
    def needs(self) -> dict[str, float]:
        """What the attempt occupies on the cluster while it runs."""
        return needs_of(self.workers, self.cpus_per_worker, self.gpus_per_worker)


class AttemptState(str, Enum):
    """Where an attempt stands. ``pending``: waiting for its resources; ``running``: its ranks
    were started; the others are final. ``lost``: the executor no longer knows the attempt
    (its supervisor or node went away)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"

    def __str__(self) -> str:
        return self.value

    @property
    def ended(self) -> bool:
        return self not in (AttemptState.PENDING, AttemptState.RUNNING)


class FailureClass(str, Enum):
    """Who an attempt's failure is down to, which decides whether it is retried:

    - ``infrastructure``: the machinery (a lost node, process, dispatcher or control plane,
      preemption). Retried without spending ``max_retries`` (up to ``MAX_INFRA_FAILURES`` per
      trial, so nothing loops forever).
    - ``trainable``: an exception of the trainable that may not happen again. Retried while
      ``max_retries`` allows; each one is counted.
    - ``deterministic``: the trainable's own verdict that retrying cannot fix
      (``TrainableError``, invalid settings, a NaN loss, a missing objective, a timeout).
      Never retried.
    """

    INFRASTRUCTURE = "infrastructure"
    TRAINABLE = "trainable"
    DETERMINISTIC = "deterministic"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class AttemptError:
    """Why an attempt ended without a result, and whether a retry can help."""

    kind: str  # the exception's class name, or "Lost", "WorkerDied", "Cancelled"
    message: str
    retryable: bool = True
    traceback: str = ""
    failure_class: FailureClass = FailureClass.TRAINABLE

    def describe(self) -> str:
        """The message, then the traceback if there is one (what the trial's error shows)."""
        return f"{self.message}\n{self.traceback}" if self.traceback else self.message

    @property
    def effective_class(self) -> FailureClass:
        """The class that decides the retry: a trainable error marked not retryable is
        deterministic."""
        if not self.retryable and self.failure_class == FailureClass.TRAINABLE:
            return FailureClass.DETERMINISTIC
        return self.failure_class


@dataclass(frozen=True)
class RankPlacement:
    """Where one DDP rank runs (the fields of ``placement.ranks[]`` in the REST API)."""

    rank: int
    node_ip: str
    node_id: str
    hostname: str
    pid: int
    device: str
    gpu_ids: list[str]
    cuda_visible_devices: str | None
    device_name: str | None
    started_at: float  # when the rank joined the process group (Unix time)


@dataclass(frozen=True)
class Checkpoint:
    """The newest checkpoint an attempt saved."""

    path: str
    step: int


@dataclass(frozen=True)
class AttemptResult:
    """What rank 0 of a finished attempt returns: the objectives' last and best values, the
    trainable's extra notes, how many metric points its reporter sent or dropped, and the
    points it could not deliver before it closed (``step``, ``name``, ``value``: the control
    plane was away as the attempt ended; the scheduler stores them before the tell)."""

    last: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    extra: dict[str, JsonValue] = field(default_factory=dict)
    metrics_sent: int = 0
    metrics_dropped: int = 0
    unsent: list[dict[str, JsonValue]] = field(default_factory=list)

    def values(self, scope: str) -> dict[str, float]:
        """The objectives' values in ``scope`` ("last" or "best")."""
        return self.best if scope == "best" else self.last


@dataclass(frozen=True)
class AttemptStatus:
    """How one attempt stands, as its supervisor reports it."""

    ref: AttemptRef
    state: AttemptState
    placements: list[RankPlacement] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    result: AttemptResult | None = None
    error: AttemptError | None = None


@dataclass(frozen=True)
class EvaluationRequest:
    """Compute held-out test metrics of one trial's checkpoint."""

    trial_id: int
    trainable: str
    config: dict[str, JsonValue]
    params: dict[str, JsonValue]
    checkpoint: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class EvaluationResult:
    """An evaluation that ended: its metrics (None if the trainable defines no ``evaluate``)
    or the error that stopped it."""

    trial_id: int
    metrics: dict[str, float] | None = None
    error: str | None = None


@dataclass(frozen=True)
class ClusterNode:
    """One node of the cluster as the executor's node table has it: its address, its total
    resources (not what is free now) and whether it is up. A node that is down is still
    reported while the cluster remembers it: it may come back, so a rank that fits only it
    waits (the preflight checks alive nodes only)."""

    node_id: str
    node_ip: str
    resources: dict[str, float] = field(default_factory=dict)
    alive: bool = True


@dataclass(frozen=True)
class PreflightRequest:
    """What every node must be able to do for attempts to run there: write and read the
    checkpoint storage (``storage_root``) and reach the control plane (``api_url``; the node
    checks that ``deployment`` answers there, not some other server). A node that has not
    finished both checks within ``timeout_s`` (its task could not be scheduled, a mount hangs)
    failed the preflight."""

    storage_root: str
    api_url: str
    deployment: str | None
    timeout_s: float = 30.0
    http_timeout_s: float = 5.0
    # (name, content) of a marker file the control plane wrote under ``storage_root``: a
    # node that reads it back shares the control plane's storage (not a folder of its own).
    shared_marker: tuple[str, str] | None = None


# The checks of a node preflight, by the name a failure reports.
PREFLIGHT_STORAGE = "storage"
PREFLIGHT_CONTROL_PLANE = "control-plane"
PREFLIGHT_SCHEDULE = "schedule"  # the node did not run (or finish) it in time
PREFLIGHT_TASK = "task"  # the task itself failed (hpo not importable there, node died)


@dataclass(frozen=True)
class NodePreflight:
    """The outcome of one node's preflight: ``failures`` maps each check that failed
    (``storage``, ``control-plane``, ``schedule``, ``task``) to what is wrong; empty when it
    passed."""

    node_id: str
    node_ip: str
    failures: dict[str, str] = field(default_factory=dict)
    checked_at: float = 0.0  # Unix time

    @property
    def ok(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        """One line naming the node and each failed check (what logs and /healthz say)."""
        if self.ok:
            return f"node {self.node_id} ({self.node_ip}): preflight passed"
        what = "; ".join(f"{check} check failed: {why}" for check, why in self.failures.items())
        return f"node {self.node_id} ({self.node_ip}): {what}"


class Executor(Protocol):
    """Runs attempts on some cluster and reports how each stands. Not thread-safe: the
    scheduler calls it from its one thread."""

    name: str  # what runs the attempts ("ray"), recorded as the trial's ``placement.executor``

    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran (and :meth:`shutdown` did not since)."""
        ...

    def start(self) -> None:
        """Connect to the cluster (start it, if local). Called once, before any other call
        but ``started``; raises if the cluster cannot be reached."""
        ...

    def shutdown(self) -> None:
        """Disconnect and forget every tracked attempt. On a local cluster that ends them; on
        a shared one they go on, for the next control plane to :meth:`adopt`."""
        ...

    def launch(self, launch: AttemptLaunch) -> None:
        """Start an attempt and track it. Any other attempt of the same trial that the
        executor tracks or its cluster still runs is cancelled first: two attempts of one
        trial never run together. Launching the same attempt twice runs it once. Raises if
        the cluster refuses the launch."""
        ...

    def adopt(self, ref: AttemptRef, needs: ClusterResources) -> bool:
        """Track an attempt an earlier control plane launched, if the cluster still runs it;
        False (nothing tracked) if it does not."""
        ...

    def statuses(self) -> list[AttemptStatus]:
        """The status of every tracked attempt. An attempt the cluster forgot, or every one
        if the cluster's supervisor is gone, is ``lost`` with an infrastructure error."""
        ...

    def release(self, ref: AttemptRef) -> None:
        """Stop tracking an attempt that ended (nothing is killed). Unknown refs are ignored."""
        ...

    def cancel(self, ref: AttemptRef) -> None:
        """End an attempt now (its processes are killed, its resources freed) and stop
        tracking it. Unknown refs are ignored; never raises for a cluster that is gone."""
        ...

    def free(self, pending: Sequence[AttemptRef]) -> dict[str, float]:
        """Cluster resources not yet claimed, less what the ``pending`` attempts (launched,
        not yet placed) are about to claim."""
        ...

    def nodes(self) -> list[ClusterNode]:
        """The cluster's nodes with their total resources, so the scheduler can refuse a trial
        whose ranks no node can ever hold (a free total across nodes says nothing about
        that: a 2-CPU rank never fits two 1-CPU nodes), and the preflight can check each alive
        one. One call to the cluster: not for every tick. Raises if the cluster cannot say."""
        ...

    def evaluate(self, request: EvaluationRequest) -> None:
        """Start computing test metrics of a checkpoint; the outcome comes from
        :meth:`evaluations`. Raises if it cannot be started."""
        ...

    def evaluations(self) -> list[EvaluationResult]:
        """Evaluations that ended since the last call, each reported once."""
        ...

    def preflight(self, node: ClusterNode, request: PreflightRequest) -> None:
        """Start the preflight on ``node`` (pinned there, needing no CPU, so a busy node runs
        it too); the outcome comes from :meth:`preflights`. A preflight of that node already
        under way is replaced."""
        ...

    def preflights(self) -> list[NodePreflight]:
        """Preflights that ended since the last call, each reported once; one that has not
        ended within its ``timeout_s`` is cancelled and reported as a ``schedule`` failure.
        Never blocks."""
        ...


# HPO_* variables a rank process may see; every other one (the admin token, the database URL,
# the Ray settings of the control plane) stays out of the cluster's processes. The object
# store's options are the ranks' own business: they write the checkpoints.
RANK_ENV_ALLOWED = frozenset({"HPO_EXTRA_TRAINABLES", "HPO_RAY_NAMESPACE", "HPO_STORAGE_OPTIONS"})
# Credentials of libraries the control plane uses, never needed by a rank.
RANK_ENV_SECRETS = frozenset({"PGPASSWORD", "PGPASSFILE", "PGSERVICEFILE", "DATABASE_URL"})


def control_plane_secrets(environ: Mapping[str, str]) -> list[str]:
    """The names in ``environ`` that rank processes must not inherit: every ``HPO_*`` variable
    but those in :data:`RANK_ENV_ALLOWED` (``HPO_TOKEN``, ``HPO_DATABASE_URL``...), and the
    database credentials of :data:`RANK_ENV_SECRETS`."""
    return sorted(
        name
        for name in environ
        if (name.startswith("HPO_") and name not in RANK_ENV_ALLOWED) or name in RANK_ENV_SECRETS
    )


def needs_of(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> dict[str, float]:
    """What ``workers`` ranks of these sizes occupy on the cluster."""
    needs = {"CPU": workers * cpus_per_worker}
    if gpus_per_worker:
        needs["GPU"] = workers * gpus_per_worker
    return needs


def fits(needs: ClusterResources, free: ClusterResources) -> bool:
    """Whether ``needs`` fit in ``free``."""
    return all(free.get(key, 0.0) + 1e-9 >= amount for key, amount in needs.items())
