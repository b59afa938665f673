"""What the core hands out: read-only records of studies, trials and metric points.

They are the API's response bodies too, so the client and the server share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, with_config
from typing_extensions import TypedDict

from hpo.service.spec import ParamValue
from hpo.service.states import (
    ACTIVE_TRIAL_STATES,
    StudyState,
    TrialState,
)

# In the order of the enum (for messages and queries); defined once in hpo.service.states.
ACTIVE_STATES = tuple(s for s in TrialState if s in ACTIVE_TRIAL_STATES)
TRIAL_STATES = tuple(TrialState)


@dataclass(frozen=True)
class MetricInput:
    """One metric point as a trial reports it."""

    step: int
    name: str
    value: float


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


@with_config(ConfigDict(extra="allow"))
class RankPlacement(TypedDict, total=False):
    """Where one DDP rank of a trial runs (see :class:`hpo.service.executor.RankPlacement`)."""

    rank: int
    node_ip: str
    node_id: str
    hostname: str
    pid: int
    device: str
    gpu_ids: list[str]
    cuda_visible_devices: str | None
    device_name: str | None
    started_at: float


@with_config(ConfigDict(extra="allow"))
class Placement(TypedDict, total=False):
    """Where a dispatched trial's current attempt runs (a plain dict: keys as written)."""

    executor: str
    attempt: int
    world_size: int
    nodes: list[str]
    startup_s: float
    ranks: list[RankPlacement]


class TrialEventRecord(_Record):
    time: datetime
    state: str
    attempt: int
    detail: str | None = None


class ScheduleParent(_Record):
    """The trial a PBT segment copied: its id, number, and the step of its checkpoint."""

    trial_id: int
    number: int
    step: int | None = None
    attempt: int | None = Field(
        default=None, description="The attempt of the copied trial that wrote the checkpoint."
    )


class ScheduleSegment(_Record):
    """Parameters a trial trained with from ``step`` on (PBT, or a replayed schedule)."""

    step: int
    params: dict[str, ParamValue]
    parent: ScheduleParent | None = None
    perturbed: dict[str, str] = {}
    attempt: int | None = Field(default=None, description="The trial's attempt it began.")
    from_attempt: int | None = Field(
        default=None,
        description="Without a parent: the trial's own attempt whose checkpoint it resumed "
        "(a PBT yield, a replay's next segment).",
    )


class LineageSegment(_Record):
    """One segment of a trial's lineage: the parameters from ``step`` on, and the trial
    (``trial_number``) that trained with them then."""

    step: int
    params: dict[str, ParamValue]
    trial_number: int


class Lineage(_Record):
    """The schedule a fresh trial follows to train as this one did (``GET
    /trials/{id}/lineage``): every copy of a PBT trial resolved to the steps the trial it
    copied trained, so ``scheduler: {type: replay, schedule: ...}`` reproduces it."""

    trial_id: int
    number: int
    study_id: int
    schedule: list[LineageSegment]
    problems: list[str] = Field(
        default=[],
        description="Where the chain of copies could not be followed (a copied trial gone, "
        "a loop): the steps before are then the trial's own parameters, not what trained them.",
    )


class TrialRecord(_Record):
    """A trial: its parameters, state, result, attempts, timings and where it ran."""

    id: int
    study_id: int
    number: int
    state: TrialState
    params: dict[str, ParamValue]
    value: float | None = None
    values: list[float] | None = None
    attempts: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    lease_expires_at: datetime | None = None
    last_step: int | None = None
    steps_copied: int = Field(
        default=0,
        description="PBT: steps the trial skipped by copying a checkpoint ahead of its own, "
        "trained by the trial it copied; ``last_step - steps_copied`` is what it is charged "
        "in ``budget.max_steps``.",
    )
    error: str | None = None
    feasible: bool | None = Field(
        default=None,
        description="A complete trial of a study with constraints: whether it meets them (its "
        "told values and last reported points), as the best trial is chosen. In trial lists.",
    )
    pruned: dict[str, Any] | None = None
    suggestion: dict[str, Any] | None = None
    placement: Placement | None = None
    has_checkpoint: bool = False
    test_metrics: dict[str, JsonValue] | None = Field(
        default=None,
        description="The best trial's held-out test metrics (or ``error`` / ``note``).",
    )
    user_attrs: dict[str, Any] = {}
    schedule: list[ScheduleSegment] | None = Field(
        default=None,
        description="PBT and replay: the parameters over the trial's steps, each segment from "
        "the step it began at, with the trial whose checkpoint it copied then, or without one "
        "the resume of its own checkpoint (None: it never resumed one this way).",
    )
    # ``seq`` moves with the trial's state, values and other fields; ``curve_seq`` also with
    # its metric points (the curves' cursor).
    seq: int
    curve_seq: int = 0
    events: list[TrialEventRecord] | None = None


class ClaimedTrial(TrialRecord):
    """A trial as handed to the one who claimed it: with the token of its current attempt,
    which only that asker ever sees (it is left out of every serialised record)."""

    attempt_token: str = Field(default="", exclude=True, repr=False)
    # A promoted trial's attempt resumes from this checkpoint (the one it paused with).
    resume_from: str | None = Field(default=None, exclude=True, repr=False)


class StudyRecord(_Record):
    """A study: its spec, state, trial counts per state and best trial(s)."""

    id: int
    name: str
    state: StudyState
    state_reason: str | None = None
    spec: dict[str, Any]
    directions: list[str]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    n_trials: int
    counts: dict[str, int]
    best_trial: TrialRecord | None = None
    best_trials: list[TrialRecord] = []
    seq: int


class MetricPointRecord(_Record):
    """One metric point; of a step reported by several attempts, the newest attempt's."""

    step: int
    name: str
    value: float
    time: datetime
    attempt: int = 1


class TrialMetricPoint(MetricPointRecord):
    """A metric point with the trial it belongs to (a study's points read together)."""

    trial_id: int
    number: int
