"""Request and response bodies of the REST API (the study spec and records live in the core)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictInt,
    field_validator,
    with_config,
)

from hpo.service.records import (
    MetricInput,
    MetricPointRecord,
    StudyRecord,
    TrialMetricPoint,
    TrialRecord,
)
from hpo.service.spec import (
    MAX_OBJECTIVES,
    MAX_PARAMS,
    MAX_STEP,
    PARAM_NAME,
    MetricName,
    Number,
    ParamValue,
    no_nul,
)
from hpo.service.warmstart import MAX_IMPORT

# Points one metrics POST may carry (README "Limits"): a bigger batch is a 422 naming `points`.
MAX_POINTS = 10_000


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetPatch(_Body):
    """The budget fields a PATCH may change (as in the spec's ``budget``); raising one that
    ended a completed study runs it again."""

    max_trials: StrictInt | None = Field(default=None, ge=1)
    max_concurrent: StrictInt | None = Field(default=None, ge=1)
    timeout_s: float | None = Field(default=None, gt=0, le=10 * 365 * 86400, allow_inf_nan=False)
    max_steps: StrictInt | None = Field(default=None, ge=1)
    max_worker_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class StudyPatch(_Body):
    """Pause, resume or stop a study; change its budget while it runs; set its user_attrs."""

    state: Literal["paused", "running", "stopped"] | None = None
    budget: BudgetPatch | None = None
    user_attrs: dict[str, Any] | None = Field(
        default=None,
        description="Merged into the study's user_attrs (a key set to null is removed); "
        "in any state, a finished study's too.",
    )


class TellBody(_Body):
    """``{"value": x}``, ``{"values": [...]}`` or ``{"state": "failed" | "pruned"}``."""

    value: Number | None = None
    values: list[Number] | None = Field(default=None, max_length=MAX_OBJECTIVES)
    state: Literal["complete", "failed", "pruned"] | None = None
    error: Annotated[str | None, AfterValidator(no_nul)] = Field(default=None, max_length=20_000)
    attempt: StrictInt | None = Field(
        default=None, ge=1, description="Refuse (409) unless this attempt is the current one."
    )

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}")
        return v

    @field_validator("values")
    @classmethod
    def _all_finite(cls, vs: list[float] | None) -> list[float] | None:
        for i, v in enumerate(vs or []):
            if not math.isfinite(v):
                raise ValueError(f"values[{i}] must be a finite number, got {v}")
        return vs


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True)
class PointIn(MetricInput):
    """A reported point, validated straight into the record the service stores (a report
    carries hundreds: no copy of each). Every check but the name's NUL check runs in
    pydantic's core, with no Python call per point."""

    step: Annotated[int, Strict(), Field(ge=0, le=MAX_STEP)]
    name: MetricName
    value: Annotated[float, Strict(), AllowInfNan(False)]


class MetricsBody(_Body):
    points: list[PointIn] = Field(max_length=MAX_POINTS)
    attempt: StrictInt | None = Field(
        default=None, ge=1, description="Refuse (409) unless this attempt is the current one."
    )


class ShouldStop(BaseModel):
    should_stop: bool


class AskAnswer(BaseModel):
    trial_id: int
    number: int
    params: dict[str, ParamValue]
    attempt: int = 1
    attempt_token: str | None = Field(
        default=None,
        description="This attempt's own credential: it may report, heartbeat and tell this "
        "trial only, and only while the attempt is current.",
    )


class StudyPage(BaseModel):
    studies: list[StudyRecord]
    next_cursor: int | None = None


class TrialPage(BaseModel):
    trials: list[TrialRecord]
    cursor: int = Field(description="Pass as `since` to get only what changed after this page.")


class MetricPage(BaseModel):
    points: list[MetricPointRecord]


class StudyMetricPage(BaseModel):
    points: list[TrialMetricPoint]
    cursor: int | None = Field(
        description="Pass as `after` for the next page; null when no trial is left."
    )


class BestAnswer(BaseModel):
    best_trial: TrialRecord | None
    best_trials: list[TrialRecord]


class ErrorBody(BaseModel):
    """Every error answer: a code (``not_found``, ``invalid_input``, …), a message, and the
    field at fault when there is one; ``details`` has one entry per problem."""

    error: str
    message: str
    field: str | None = None
    details: list[dict[str, Any]] | None = None


# How the routes that answer files declare them (their bodies are not JSON).
CSV: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One CSV row per trial, with a header row",
        "content": {"text/csv": {"schema": {"type": "string"}}},
    }
}
ARCHIVE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The checkpoint folder as a gzipped tar archive",
        "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
    }
}


class AskBody(_Body):
    """Optional body of an ask: parameter values the new trial must take (the sampler fills in
    the rest); each is checked against the space (422 naming ``params.<name>``)."""

    params: dict[str, ParamValue] | None = Field(default=None, max_length=MAX_PARAMS)


class EnqueueBody(_Body):
    """A trial to queue with fixed parameters: handed out by the next ask, before new ones."""

    params: dict[str, ParamValue] = Field(max_length=MAX_PARAMS)


class FinishedTrialIn(_Body):
    """A finished trial to import: its parameters and outcome."""

    params: dict[str, ParamValue] = Field(max_length=MAX_PARAMS)
    state: Literal["complete", "pruned", "failed"] = "complete"
    value: Number | None = None
    values: list[Number] | None = Field(default=None, max_length=MAX_OBJECTIVES)
    user_attrs: dict[str, Any] = Field(default_factory=dict)


class ImportBody(_Body):
    """Finished trials (from another study, or an Optuna study) to store in this one."""

    trials: list[FinishedTrialIn] = Field(max_length=MAX_IMPORT)


class ImportAnswer(BaseModel):
    trials: list[TrialRecord]


class SuggestBody(_Body):
    """A parameter a running trial names: ``{"name": "lr", "param": {"type": "float", "low":
    1e-5, "high": 0.1, "log": true}}`` (the same shape as a ``space`` entry)."""

    name: str = Field(pattern=f"^{PARAM_NAME}$")
    param: dict[str, Any]


class SuggestAnswer(BaseModel):
    name: str
    value: ParamValue
