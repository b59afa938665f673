"""The study spec and its search space, defined once.

REST bodies, YAML files, the Python client and the samplers all validate through
:class:`StudySpec`. Validation errors name the field (``space.lr.high``) so the API can answer
422 with a message a user can act on.

This module is longer than most (~600 lines) on purpose: it is the data model, and keeping
every parameter kind, its validation and the spec's cross-field rules in one file is what lets
a reader check a rule against the others.
"""

from __future__ import annotations

import bisect
import functools
import io
import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PositiveFloat,
    Strict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from hpo.service.algorithms import PRUNERS, SAMPLERS

ParamValue = StrictBool | StrictInt | StrictFloat | StrictStr | None
# Strict: a number, never a numeric string or a bool (ints are accepted and kept exact).
Number = Annotated[float, Strict()]

# Letters, digits, ".", "_" and "-"; not all digits (those name study ids on the CLI).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# Integers stay exact as floats (Optuna, JSON clients) within this bound.
MAX_INT = 2**53
# How deeply free-form JSON (user_attrs, trainable.config) may nest: the stored spec is parsed
# again on every read, and that parser stops at 200 levels.
MAX_JSON_DEPTH = 32
# Caps on what one spec may carry (README "Limits"); each is a 422 naming the field. Free-form
# JSON (user_attrs, trainable.config) is stored with the study and sent with every read of it.
MAX_JSON_BYTES = 64 * 1024
MAX_DESCRIPTION = 10_000
MAX_PARAMS = 1_000
MAX_CHOICES = 1_000
# The largest step a report, a rung or a budget may name (a 64-bit column; 2**62 leaves room).
MAX_STEP = 2**62
MAX_OBJECTIVES = 64


class _Model(BaseModel):
    # NaN and ±inf are never a valid setting; JSON cannot even store them (PostgreSQL refuses
    # the document), so they are a 422 here rather than a corrupt spec later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    return value


def no_nul(value: str | None) -> str | None:
    """Refuse NUL characters: PostgreSQL text columns cannot store them."""
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL (\\x00) characters")
    return value


# A metric's name, as objectives, pruners and reported points spell it.
MetricName = Annotated[StrictStr, Field(min_length=1, max_length=128), AfterValidator(no_nul)]


class JsonProblem(ValueError):
    """Free-form JSON that is not accepted; ``where`` is its path (``user_attrs.my key``)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where


def check_json(value: Any, where: str, depth: int = 0) -> None:
    """Free-form JSON must round-trip: finite numbers only, nested at most MAX_JSON_DEPTH deep."""
    if depth > MAX_JSON_DEPTH:
        raise JsonProblem(where, f"{where} is nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise JsonProblem(where, f"{where} must be a finite number, got {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            check_json(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_json(v, f"{where}[{i}]", depth + 1)


def check_json_size(value: Any, where: str) -> None:
    """Free-form JSON must fit in MAX_JSON_BYTES once written as compact JSON."""
    size = len(json.dumps(value, separators=(",", ":"), default=str))
    if size > MAX_JSON_BYTES:
        raise JsonProblem(
            where, f"{where} is {size} bytes as JSON; at most {MAX_JSON_BYTES} are accepted"
        )


class _Conditional(_Model):
    when: dict[str, Annotated[list[ParamValue], Field(max_length=MAX_CHOICES)]] | None = Field(
        default=None,
        description="Active only when each named parameter takes one of the listed values.",
    )
    mutable: bool = Field(
        default=False,
        description="PBT: changed while the trial trains (perturbed or resampled when the "
        "trial copies a better one's checkpoint).",
    )

    @field_validator("when")
    @classmethod
    def _when_not_empty(cls, when: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        if when is not None:
            if not when:
                raise ValueError("`when` must name at least one parameter")
            for parent, values in when.items():
                if not values:
                    raise ValueError(f"`when.{parent}` must list at least one value")
        return when


def _on_lattice(low: float, step: float, value: float) -> bool:
    """Whether ``value`` is on the lattice ``low + k * step``, up to the rounding of that sum
    (which grows with the magnitudes, not with k: low = 1e7, step = 0.1)."""
    nearest = low + round((value - low) / step) * step
    slack = 1e-9 * step + 8 * sys.float_info.epsilon * max(abs(low), abs(value))
    return abs(value - nearest) <= slack


def lattice_point(low: float, step: float, k: int) -> float:
    """``low + k * step`` as the decimals read (0.1 * 3 is 0.3, -0.3 + 3 * 0.1 is 0, 1e-300
    steps stay apart), rounded once to a float: the values a float ``step`` takes."""
    return float(Decimal(repr(float(low))) + k * Decimal(repr(float(step))))


class FloatParam(_Conditional):
    """A real number in ``[low, high]``, optionally on a log scale or a ``step`` lattice."""

    type: Literal["float"]
    low: Number | None = None
    high: Number | None = None
    log: bool = False
    step: Number | None = None
    values: list[Number] | None = Field(
        default=None,
        max_length=MAX_CHOICES,
        description="Explicit values to grid over (grid sampler).",
    )

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        if self.values is not None:
            _check_values(self.values)
            lo, hi = min(self.values), max(self.values)
            if self.low is None and self.high is None:
                object.__setattr__(self, "low", float(lo))
                object.__setattr__(self, "high", float(hi))
        _check_range(self, integer=False)
        return self

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.values is not None:
            return any(math.isclose(value, v, rel_tol=1e-12) for v in self.values)
        # a few units in the last place of the bounds (a rounding), relative to their size:
        # an absolute 1e-12 let 9e-13 into [1e-20, 1e-18], and 0 into a log scale. (Samplers
        # keep their values inside: exp(log(high)) may be further off on a log scale.)
        slack = 4 * sys.float_info.epsilon * max(abs(self.low), abs(self.high))
        if not self.low - slack <= value <= self.high + slack or (self.log and value <= 0):
            return False
        return self.step is None or _on_lattice(self.low, self.step, value)

    def representatives(self) -> list[Any]:
        """Values that exercise the domain (for validating a trainable's settings)."""
        return list(self.values) if self.values is not None else [float(self.low), float(self.high)]


class IntParam(_Conditional):
    """An integer in ``[low, high]`` (inclusive), optionally on a log scale or every ``step``."""

    type: Literal["int"]
    low: StrictInt | None = None
    high: StrictInt | None = None
    log: bool = False
    step: StrictInt = 1
    values: list[StrictInt] | None = Field(default=None, max_length=MAX_CHOICES)

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        if self.values is not None:
            _check_values(self.values)
            if self.low is None and self.high is None:
                object.__setattr__(self, "low", min(self.values))
                object.__setattr__(self, "high", max(self.values))
        _check_range(self, integer=True)
        return self

    def representatives(self) -> list[Any]:
        if self.values is not None:
            return list(self.values)
        return [self.low, self.low + (self.high - self.low) // self.step * self.step]  # on it

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        if self.values is not None:
            return value in self.values
        return self.low <= value <= self.high and (value - self.low) % self.step == 0


class CategoricalParam(_Conditional):
    """One of a fixed list of choices (strings, numbers, booleans or null)."""

    type: Literal["categorical"]
    choices: list[ParamValue] = Field(max_length=MAX_CHOICES)

    @field_validator("choices")
    @classmethod
    def _choices(cls, choices: list[Any]) -> list[Any]:
        if not choices:
            raise ValueError("`choices` must not be empty")
        seen: set[tuple[type, Any]] = set()
        for c in choices:
            if isinstance(c, float):
                _finite(c, "a choice")
            if (type(c), c) in seen:
                raise ValueError(f"`choices` lists {c!r} twice")
            seen.add((type(c), c))
        return choices

    def representatives(self) -> list[Any]:
        return list(self.choices)

    def contains(self, value: Any) -> bool:
        return any(type(value) is type(c) and value == c for c in self.choices) or (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and any(
                isinstance(c, (int, float)) and not isinstance(c, bool) and c == value
                for c in self.choices
            )
        )


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


def _check_values(values: list[Any]) -> None:
    if not values:
        raise ValueError("`values` must not be empty")
    for v in values:
        _finite(float(v), "each of `values`")
    if len(set(values)) != len(values):
        raise ValueError("`values` lists a value twice")


def _check_range(p: FloatParam | IntParam, *, integer: bool) -> None:
    if p.low is None or p.high is None:
        missing = "low" if p.low is None else "high"
        raise ValueError(f"`{missing}` is required (or give explicit `values`)")
    _finite(float(p.low), "`low`")
    _finite(float(p.high), "`high`")
    if integer and max(abs(p.low), abs(p.high)) > MAX_INT:
        raise ValueError(f"`low` and `high` must lie within ±2**53, got [{p.low}, {p.high}]")
    if not math.isfinite(float(p.high) - float(p.low)) or abs(p.low) > 1e300 or abs(p.high) > 1e300:
        raise ValueError(f"the range [{p.low}, {p.high}] is too wide to sample")
    if p.low > p.high:
        raise ValueError(f"`low` ({p.low}) must not be greater than `high` ({p.high})")
    if p.log and p.low <= 0:
        raise ValueError(f"`low` must be > 0 on a log scale, got {p.low}")
    if p.step is not None:
        if p.step <= 0:
            raise ValueError(f"`step` must be > 0, got {p.step}")
        if p.log and (not integer or p.step != 1):
            raise ValueError("`step` cannot be combined with `log: true`")
        if not integer:
            _finite(float(p.step), "`step`")
            steps = (float(p.high) - float(p.low)) / float(p.step)
            if not math.isfinite(steps) or steps > MAX_INT:
                raise ValueError(
                    f"`step` ({p.step}) is too small for [{p.low}, {p.high}]: more than 2**53 steps"
                )
    if p.values is not None:
        for v in p.values:
            if not p.low <= v <= p.high:
                raise ValueError(f"value {v} in `values` lies outside [low, high]")


class Objective(_Model):
    """A metric the study optimises, and whether bigger is better."""

    metric: MetricName
    direction: Literal["minimize", "maximize"] = "minimize"
    scope: Literal["last", "best"] = Field(
        default="last",
        description="For dispatched trials: the value of the last report, or the best one.",
    )


_CONSTRAINT = re.compile(r"^\s*(\S+)\s*(<=|>=)\s*(\S+)\s*$")
MAX_CONSTRAINTS = 16


class Constraint(_Model):
    """A trial is feasible only when ``metric op bound`` holds of it (``latency <= 120``).

    Written as that one string in specs and answers; the metric's value is the trial's told
    value when ``metric`` is an objective, else its last reported point of ``metric``.
    """

    metric: MetricName
    op: Literal["<=", ">="]
    bound: Number

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        match = _CONSTRAINT.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not of the form 'metric <= number' (or >=)")
        metric, op, bound = match.groups()
        try:
            number = float(bound)
        except ValueError:
            raise ValueError(f"{bound!r} in {value!r} is not a number") from None
        return {"metric": metric, "op": op, "bound": number}

    @field_validator("bound")
    @classmethod
    def _finite_bound(cls, value: float) -> float:
        return _finite(value, "the bound")

    def violation(self, value: float) -> float:
        """How far ``value`` lies on the wrong side of the bound (<= 0: satisfied)."""
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self) -> str:
        whole = float(self.bound).is_integer() and abs(self.bound) < 2**53
        return f"{self.metric} {self.op} {int(self.bound) if whole else self.bound!r}"


class SamplerSpec(_Model):
    """Which sampler suggests parameters. ``seed`` makes suggestions reproducible."""

    type: StrictStr = "tpe"
    seed: StrictInt | None = Field(default=None, ge=0)
    n_startup_trials: StrictInt = Field(
        default=10, ge=0, description="Random trials before TPE, GP or CMA-ES."
    )
    multivariate: bool = Field(default=True, description="TPE: model parameters jointly.")
    population_size: StrictInt | None = Field(
        default=None, ge=2, le=10_000, description="CMA-ES, NSGA-II: trials per generation."
    )
    qmc_type: Literal["sobol", "halton"] = Field(default="sobol", description="QMC: sequence.")
    scramble: bool = Field(default=False, description="QMC: scramble the sequence (needs seed).")
    min_points_in_model: StrictInt | None = Field(
        default=None,
        ge=1,
        description="BOHB: observations a rung needs before TPE is fitted on it "
        "(default: the number of parameters + 1).",
    )

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in SAMPLERS:
            raise ValueError(f"unknown sampler {value!r}; expected one of {', '.join(SAMPLERS)}")
        return value

    @model_validator(mode="after")
    def _scramble_seeded(self) -> SamplerSpec:
        # Every ask must walk the same sequence: an unseeded scramble would differ per ask.
        if self.type == "qmc" and self.scramble and self.seed is None:
            raise ValueError("seed: required with `scramble: true` (every ask scrambles alike)")
        return self


class PrunerSpec(_Model):
    """How running trials are stopped early from their metric streams."""

    type: StrictStr = "none"
    min_steps: StrictInt = Field(
        default=1,
        ge=0,
        le=MAX_STEP,
        description="ASHA, Hyperband: first rung (at least 1); median and the others: the first "
        "step judged.",
    )
    reduction_factor: StrictInt = Field(
        default=3, ge=2, description="ASHA: keep the top 1/η per rung."
    )
    max_steps: StrictInt | None = Field(
        default=None, ge=1, le=MAX_STEP, description="ASHA: no rung beyond this."
    )
    n_startup_trials: StrictInt = Field(
        default=5, ge=0, description="Median: trials before pruning."
    )
    metric: MetricName | None = Field(default=None, description="Defaults to the objective metric.")
    direction: Literal["minimize", "maximize"] | None = Field(
        default=None, description="Of `metric`, when it is not an objective."
    )
    # "current" is what a stored spec without the field always meant; "best_so_far" is
    # Optuna's MedianPruner/PercentilePruner.
    compare: Literal["current", "best_so_far"] = Field(
        default="current",
        description="Median, percentile: judge the value at the step, or the trial's best so far.",
    )
    percentile: Number = Field(
        default=50.0, ge=0, le=100, description="Percentile: keep trials in the best this %."
    )
    lower: Number | None = Field(default=None, description="Threshold: stop below this value.")
    upper: Number | None = Field(default=None, description="Threshold: stop above this value.")
    patience: StrictInt = Field(
        default=3, ge=0, description="Patient: steps without improvement before stopping."
    )
    min_delta: Number = Field(default=0.0, ge=0, description="Patient: what counts as improving.")
    wrapped: PrunerSpec | None = Field(
        default=None, description="Patient: the pruner that must also agree to stop."
    )
    p_threshold: Number = Field(
        default=0.1, ge=0, le=1, description="Wilcoxon: stop when p is below this."
    )
    mode: Literal["stopping", "promotion"] = Field(
        default="stopping",
        description="ASHA, Hyperband: `stopping` ends a trial below its rung's top 1/η for good; "
        "`promotion` pauses every trial at each rung and resumes (promotes) it from its "
        "checkpoint once it is in the top 1/η of that rung.",
    )

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in PRUNERS:
            raise ValueError(f"unknown pruner {value!r}; expected one of {', '.join(PRUNERS)}")
        return value

    @model_validator(mode="after")
    def _options_fit(self) -> PrunerSpec:
        if self.type == "threshold" and self.lower is None and self.upper is None:
            raise ValueError("lower: a threshold pruner needs `lower`, `upper` or both")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"lower: {self.lower} is above upper ({self.upper})")
        if self.wrapped is not None:
            if self.type != "patient":
                raise ValueError("wrapped: only a `patient` pruner wraps another")
            if self.wrapped.metric not in (None, self.metric):
                raise ValueError("wrapped.metric: the wrapped pruner watches the same metric")
        return self

    @model_validator(mode="after")
    def _promotion_needs_rungs(self) -> PrunerSpec:
        if self.mode == "promotion" and self.type not in ("asha", "hyperband"):
            raise ValueError(f"mode: promotion needs type asha or hyperband, not {self.type!r}")
        if self.type == "hyperband" and self.max_steps is None:
            raise ValueError("hyperband needs max_steps (its brackets span min_steps..max_steps)")
        if self.type in ("asha", "hyperband") and self.min_steps < 1:
            raise ValueError(f"min_steps: {self.type}'s first rung is step 1 or later, not 0")
        return self


class Budget(_Model):
    """How much the study may spend. ``max_trials`` counts distinct trial numbers."""

    max_trials: StrictInt | None = Field(default=None, ge=1)
    max_concurrent: StrictInt | None = Field(default=None, ge=1)
    timeout_s: Number | None = Field(
        default=None,
        gt=0,
        le=10 * 365 * 86400,
        description="Wall time of the whole study: once it passes, running trials are "
        "cancelled (failed) and the study completes.",
    )
    trial_timeout_s: Number | None = Field(
        default=None,
        gt=0,
        le=10 * 365 * 86400,
        description="Wall time of one attempt, from its start: an attempt still running "
        "after it fails its trial (not retried).",
    )
    max_steps: StrictInt | None = Field(
        default=None,
        ge=1,
        le=MAX_STEP,
        description="Steps of training summed over all trials (a resumed trial counts each "
        "step once): no point beyond it is stored, the trial that reaches it is pruned there, "
        "and no trial is started or promoted after it. Compares schedulers at equal compute.",
    )
    max_worker_seconds: Number | None = Field(
        default=None,
        gt=0,
        description="Compute summed over all attempts: ranks x wall seconds from claim to end. "
        "Once it is used, no trial is started or promoted, and each running trial is pruned at "
        "its next metric report.",
    )


class PbtSpec(_Model):
    """Population based training (Jaderberg et al., 2017): ``population`` trials train side by
    side; every ``interval_steps`` a trial in the bottom ``quantile`` of the values there
    copies the checkpoint and parameters of one in the top ``quantile`` and perturbs its
    ``mutable`` parameters (each resampled with probability ``resample_p``, else multiplied
    by one of ``perturb``)."""

    type: Literal["pbt"] = "pbt"
    population: StrictInt = Field(ge=2, le=10_000, description="Trials trained side by side.")
    interval_steps: StrictInt = Field(
        ge=1, le=MAX_STEP, description="Steps between exploit decisions."
    )
    quantile: Number = Field(
        default=0.25, gt=0, le=0.5, description="Bottom (and top) fraction of the population."
    )
    resample_p: Number = Field(
        default=0.25, ge=0, le=1, description="Chance that a mutable parameter is resampled."
    )
    perturb: tuple[PositiveFloat, PositiveFloat] = Field(
        default=(0.8, 1.2), description="Factors a numeric mutable parameter is multiplied by."
    )
    max_steps: StrictInt | None = Field(
        default=None,
        ge=1,
        le=MAX_STEP,
        description="The step the trials end at: none exploits or yields there or past it "
        "(a copy of a finished trial would only repeat its result).",
    )

    @model_validator(mode="after")
    def _a_boundary_before_the_end(self) -> PbtSpec:
        if self.max_steps is not None and self.max_steps <= self.interval_steps:
            raise ValueError(
                f"scheduler.max_steps ({self.max_steps}) must be more than "
                f"scheduler.interval_steps ({self.interval_steps}), or no trial ever copies"
            )
        return self


class ReplaySegment(_Model):
    """The parameters a replayed schedule trains with from ``step`` on (``trial_number``: the
    trial that trained with them, as a lineage names it; kept, not used)."""

    step: StrictInt = Field(ge=0, le=MAX_INT)
    params: dict[str, ParamValue] = Field(max_length=MAX_PARAMS)
    trial_number: StrictInt | None = None


class ReplaySpec(_Model):
    """Train along a given hyperparameter schedule: what a PBT trial's lineage
    (``GET /trials/{id}/lineage``, ``hpo replay``) reproduces. Each trial starts with the first
    segment's parameters; when it reports a later segment's step it pauses and resumes from
    its own checkpoint at that step with that segment's parameters (the others kept), as a
    PBT trial did when it copied. Later segments may change only ``mutable`` parameters."""

    type: Literal["replay"] = "replay"
    schedule: list[ReplaySegment] = Field(min_length=1, max_length=10_000)

    @field_validator("schedule")
    @classmethod
    def _steps_ascend(cls, schedule: list[ReplaySegment]) -> list[ReplaySegment]:
        if schedule[0].step != 0:
            raise ValueError(f"the first segment starts at step 0, not {schedule[0].step}")
        for i, (a, b) in enumerate(itertools.pairwise(schedule), start=1):
            if b.step <= a.step:
                raise ValueError(
                    f"segment {i} starts at step {b.step}, not after segment {i - 1}'s {a.step}"
                )
        return schedule

    def segment_at(self, step: int) -> int:
        """The index of the segment in force at ``step`` (the last one starting at or before it)."""
        return bisect.bisect_right([seg.step for seg in self.schedule], step) - 1

    def params_of(self, index: int) -> dict[str, Any]:
        """Every parameter as segment ``index`` has it (later segments name only changes)."""
        out: dict[str, Any] = {}
        for segment in self.schedule[: index + 1]:
            out.update(segment.params)
        return out


def _scheduler_type(value: Any) -> str:
    """The block's type; without one, a replay if it holds a schedule, else PBT (a stored
    spec may omit pbt's default)."""
    if isinstance(value, Mapping):
        return str(value.get("type", "replay" if "schedule" in value else "pbt"))
    return str(getattr(value, "type", "pbt"))


SchedulerSpec = Annotated[
    Annotated[PbtSpec, Tag("pbt")] | Annotated[ReplaySpec, Tag("replay")],
    Discriminator(
        _scheduler_type,
        custom_error_type="scheduler_type",
        custom_error_message="must be 'pbt' or 'replay'",
    ),
]


class Resources(_Model):
    """What one trial occupies on the cluster: ``workers_per_trial`` DDP ranks, each with these."""

    workers_per_trial: StrictInt = Field(default=1, ge=1, le=1024)
    gpus_per_worker: Number = Field(default=0, ge=0)
    cpus_per_worker: Number = Field(default=1, gt=0)

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpu_share(cls, value: float) -> float:
        if value > 1 and not float(value).is_integer():
            raise ValueError("more than one GPU per worker must be a whole number")
        return value


class TrainableSpec(_Model):
    """A registered trainable (entry point group ``hpo.trainables``) and its fixed settings."""

    name: StrictStr = Field(min_length=1, max_length=128)
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("config")
    @classmethod
    def _json_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        check_json(config, "config")
        check_json_size(config, "config")
        return config


PARAM_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}"  # a letter or _, then up to 127 more


def is_param_name(name: Any) -> bool:
    """Whether ``name`` can name a parameter (the whole of it: ``re.match``'s ``$`` also
    matched before a final newline, and 129 characters reached a 128-character column)."""
    return isinstance(name, str) and re.fullmatch(PARAM_NAME, name) is not None


class StudySpec(_Model):
    """Everything that defines a study. Validated once, stored as JSON with the study."""

    name: StrictStr = Field(pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=MAX_DESCRIPTION)
    # One objective is accepted, and stored and answered, as an object; several as a list.
    # The schema says so in both directions, so a spec read back validates as written.
    objective: Annotated[
        list[Objective],
        BeforeValidator(_as_list, json_schema_input_type=Objective | list[Objective]),
    ] = Field(description="One objective, or a list of them (multi-objective: a Pareto front).")
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    budget: Budget = Field(default_factory=Budget)
    resources: Resources = Field(default_factory=Resources)
    trainable: TrainableSpec | None = None
    scheduler: SchedulerSpec | None = Field(
        default=None,
        description="Population based training (`type: pbt`), or the replay of a schedule "
        "(`type: replay`); trials then change their `mutable` parameters as they train "
        "(see PbtSpec, ReplaySpec).",
    )
    define_by_run: bool = Field(
        default=False,
        description="Parameters may also be first named while a trial runs (Optuna's "
        "define-by-run): the server adds each to `space` on first use and samples it "
        "independently until it is part of the space every ask samples jointly. `space` may "
        "then start empty.",
    )
    space: dict[str, Param] = Field(max_length=MAX_PARAMS)
    max_retries: StrictInt = Field(
        default=0, ge=0, le=100, description="Retries of a failed attempt."
    )
    lease_s: Number = Field(
        default=300.0,
        gt=0,
        le=30 * 86400,
        description="A running trial that reports nothing for this long fails.",
    )
    progress_timeout_s: Number | None = Field(
        default=None,
        gt=0,
        le=30 * 86400,
        description="A running attempt must report a new metric point within this long "
        "(heartbeats do not count); one that does not fails as 'no progress' (retried while "
        "max_retries allows).",
    )
    user_attrs: dict[str, Any] = Field(default_factory=dict)
    constraints: list[Constraint] = Field(
        default_factory=list,
        max_length=MAX_CONSTRAINTS,
        description="Feasibility: 'metric <= number' or 'metric >= number'. The best trial is "
        "a feasible one; TPE, GP and NSGA-II sample towards feasible regions.",
    )

    @field_validator("name")
    @classmethod
    def _not_a_number(cls, value: str) -> str:
        if value.isdigit():
            raise ValueError("a study name needs a character other than a digit (ids are numbers)")
        return value

    @field_validator("objective")
    @classmethod
    def _objectives(cls, value: list[Objective]) -> list[Objective]:
        if not value:
            raise ValueError("at least one objective is required")
        if len(value) > MAX_OBJECTIVES:
            raise ValueError(f"at most {MAX_OBJECTIVES} objectives, got {len(value)}")
        names = [o.metric for o in value]
        if len(set(names)) != len(names):
            raise ValueError("each objective must name a different metric")
        return value

    @field_validator("user_attrs")
    @classmethod
    def _json_attrs(cls, attrs: dict[str, Any]) -> dict[str, Any]:
        check_json(attrs, "user_attrs")
        check_json_size(attrs, "user_attrs")
        return attrs

    @field_serializer("objective")
    def _objective_out(self, value: list[Objective]) -> Objective | list[Objective]:
        return value[0] if len(value) == 1 else value

    @field_serializer("constraints")
    def _constraints_out(self, value: list[Constraint]) -> list[str]:
        return [str(c) for c in value]

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if not space and not info.data.get("define_by_run"):
            raise ValueError(
                "the search space must define at least one parameter (or set define_by_run)"
            )
        for name in space:
            if not is_param_name(name):
                raise ValueError(f"parameter name {name!r} is not a valid identifier")
        _check_conditions(space)
        return space

    @model_validator(mode="after")
    def _declared_for_trainables(self) -> StudySpec:
        if self.define_by_run and self.trainable is not None:
            raise ValueError(
                "define_by_run: a study with a trainable declares its whole space (its "
                "trials run on the cluster and name no parameters at run time)"
            )
        return self

    @model_validator(mode="after")
    def _pbt_fits(self) -> StudySpec:
        pbt = self.scheduler
        if pbt is None:
            mutable = [name for name, p in self.space.items() if p.mutable]
            if mutable:
                raise ValueError(
                    f"space.{mutable[0]}.mutable: `mutable` parameters need "
                    "`scheduler: {type: pbt}` (or a replay)"
                )
            return self
        if isinstance(pbt, ReplaySpec):
            return self._replay_fits(pbt)
        if self.trainable is None:
            raise ValueError(
                "scheduler.type: pbt copies checkpoints between trials: the study needs a trainable"
            )
        if self.pruner.type != "none":
            raise ValueError("pruner.type: pbt decides which trials go on; use no pruner")
        if self.multi_objective:
            raise ValueError("scheduler.type: pbt ranks trials by one objective")
        if not any(p.mutable for p in self.space.values()):
            raise ValueError("space: pbt needs at least one parameter with `mutable: true`")
        if self.sampler.type == "grid":
            raise ValueError(
                "sampler.type: pbt starts a population of trials; a grid may hold fewer "
                "points than `scheduler.population` (use random or another sampler)"
            )
        if any(p.when for p in self.space.values()):
            raise ValueError("space: pbt does not take conditional (`when`) parameters")
        limit = self.budget.max_trials
        if limit is not None and limit != pbt.population:
            raise ValueError(
                f"budget.max_trials: a pbt study runs scheduler.population = {pbt.population} "
                f"trials; got {limit}"
            )
        return self

    def _replay_fits(self, replay: ReplaySpec) -> StudySpec:
        """A replayed schedule needs what PBT needs (a trainable, no pruner, no grid, no
        conditional parameters) and a number of trials; it names only parameters of the space
        with values in their domains, starts with all of them, and changes only ``mutable``
        ones later (the others shape what the checkpoint holds)."""
        if self.trainable is None:
            raise ValueError(
                "scheduler.type: replay resumes trials from their checkpoints: the study needs "
                "a trainable"
            )
        if self.pruner.type != "none":
            raise ValueError(
                "pruner.type: a replayed schedule is trained to its end; use no pruner"
            )
        if self.budget.max_trials is None:
            raise ValueError(
                "budget.max_trials: required with scheduler.type replay (how many trials train "
                "the schedule)"
            )
        if self.sampler.type == "grid":
            raise ValueError(
                "sampler.type: a replay's trials take the schedule's parameters; a grid hands "
                "out its own points (use random)"
            )
        if any(p.when for p in self.space.values()):
            raise ValueError("space: a replay does not take conditional (`when`) parameters")
        current: dict[str, Any] = {}
        for i, segment in enumerate(replay.schedule):
            where = f"scheduler.schedule[{i}].params"
            for name, value in segment.params.items():
                param = self.space.get(name)
                if param is None:
                    raise ValueError(f"{where}.{name}: not a parameter of the space")
                if not param.contains(value):
                    raise ValueError(f"{where}.{name}: {value!r} is outside the space")
                if i > 0 and not param.mutable and value != current.get(name):
                    raise ValueError(
                        f"{where}.{name}: only `mutable` parameters change along a schedule "
                        f"(it was {current.get(name)!r})"
                    )
            current.update(segment.params)
            missing = [name for name in self.space if name not in current]
            if missing:
                raise ValueError(f"{where}.{missing[0]}: missing from the first segment")
        return self

    @model_validator(mode="after")
    def _pruner_fits(self) -> StudySpec:
        if self.pruner.type == "none":
            return self
        if self.multi_objective and self.pruner.metric is None:
            raise ValueError(
                "pruner.metric: a multi-objective study must name the metric its pruner watches"
            )
        if self.multi_objective and "wilcoxon" in _pruner_types(self.pruner):
            raise ValueError(
                "pruner.type: wilcoxon compares with the best trial, which only a "
                "single-objective study has"
            )
        objectives = {o.metric for o in self.objectives}
        if self.pruner.metric not in (None, *objectives) and self.pruner.direction is None:
            raise ValueError(
                f"pruner.direction: required because pruner.metric {self.pruner.metric!r} "
                "is not an objective"
            )
        return self

    @property
    def constraint_metrics(self) -> list[str]:
        """The metrics the constraints read, each once."""
        return list(dict.fromkeys(c.metric for c in self.constraints))

    def violations(
        self, values: Sequence[float] | None, metrics: Mapping[str, float]
    ) -> list[float]:
        """Each constraint's violation for a trial with objective ``values`` (None: not told)
        and last reported ``metrics``: <= 0 when it holds, inf when its metric has no value.
        An objective's told value is preferred to its reports."""
        names = [o.metric for o in self.objectives]
        told = {} if values is None else dict(zip(names, values, strict=False))
        out = []
        for c in self.constraints:
            value = told.get(c.metric, metrics.get(c.metric))
            out.append(math.inf if value is None else c.violation(value))
        return out

    @property
    def objectives(self) -> list[Objective]:
        return self.objective

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def pbt(self) -> PbtSpec | None:
        """The study's population based training, if it runs one."""
        return self.scheduler if isinstance(self.scheduler, PbtSpec) else None

    @property
    def replay(self) -> ReplaySpec | None:
        """The schedule the study's trials replay, if they do."""
        return self.scheduler if isinstance(self.scheduler, ReplaySpec) else None

    @property
    def max_trials(self) -> int | None:
        """How many trials the study runs: ``budget.max_trials``, or a pbt population."""
        if isinstance(self.scheduler, PbtSpec):
            return self.scheduler.population
        return self.budget.max_trials

    @property
    def pruned_metric(self) -> str:
        return self.pruner.metric or self.objectives[0].metric

    @property
    def pruner_direction(self) -> str:
        if self.pruner.direction is not None:
            return self.pruner.direction
        metric = self.pruned_metric
        return next(o.direction for o in self.objectives if o.metric == metric)

    def parameter_order(self) -> list[str]:
        """Parameter names with every parent before the parameters conditioned on it."""
        return _topological_order(self.space)

    def is_active(self, name: str, params: Mapping[str, Any]) -> bool:
        """Whether ``name`` takes part in a trial whose other parameters are ``params``."""
        when = self.space[name].when
        if not when:
            return True
        for parent, allowed in when.items():
            if parent not in params or not self.is_active(parent, params):
                return False
            if not any(_same(params[parent], a) for a in allowed):
                return False
        return True

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a full parameter assignment (e.g. an enqueued trial); return it in order."""
        out: dict[str, Any] = {}
        for name in params:
            if name not in self.space:
                raise ValueError(f"params.{name}: not a parameter of this study's space")
        for name in self.parameter_order():
            active = self.is_active(name, {**params})
            if not active:
                if name in params:
                    raise ValueError(f"params.{name}: inactive under the given parent values")
                continue
            if name not in params:
                raise ValueError(
                    f"params.{name}: missing (a queued trial gives every active parameter; "
                    "an ask with params fixes some and samples the rest)"
                )
            if not self.space[name].contains(params[name]):
                raise ValueError(f"params.{name}: {params[name]!r} lies outside its domain")
            out[name] = params[name]
        return out

    @classmethod
    def from_yaml(cls, source: str | Path) -> StudySpec:
        """Load a spec from a YAML file path or YAML text (see :func:`load_yaml`)."""
        if not _looks_like_path(source):
            data = load_yaml(str(source))
        else:
            with Path(source).open("rb") as f:  # /dev/zero, a huge file: read no more
                raw = f.read(MAX_SPEC_BYTES + 1)
            if len(raw) > MAX_SPEC_BYTES:
                raise ValueError(f"{source}: over {MAX_SPEC_BYTES} bytes; a study spec is smaller")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{source}: not UTF-8 text (byte {exc.start})") from exc
            data = load_yaml(text, name=str(source))
        if not isinstance(data, dict):
            where = f"{source}: " if _looks_like_path(source) else ""
            got = "it is empty" if data is None else f"it holds a {type(data).__name__}"
            raise ValueError(f"{where}a study spec must be a YAML mapping; {got}")
        return cls.model_validate(data)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_defaults=False)


# The largest study spec file read (the API's own body limit is 8 MiB by default).
MAX_SPEC_BYTES = 8 * 2**20

# The largest count a budget takes (2**53: exact as a float and in the dashboard's JavaScript).
MAX_COUNT = 2**53


def check_budget(
    budget: Budget, keys: Iterable[str] = ("max_trials", "max_concurrent", "max_steps")
) -> None:
    """Refuse (ValueError naming the field) budget counts (those of ``keys``: an edit's)
    past :data:`MAX_COUNT`. Checked where a budget is given (a new study, an edit), not when
    a stored spec is read back, so a study stored before the check stays readable; so are
    those of :func:`check_new`."""
    for key in set(keys) & {"max_trials", "max_concurrent", "max_steps"}:
        value = getattr(budget, key)
        if value is not None and value > MAX_COUNT:
            raise ValueError(f"budget.{key}: at most 2**53 ({MAX_COUNT}), got {value}")


def check_new(spec: StudySpec) -> None:
    """The checks of a spec that creates a study which a stored spec is not held to (see
    :func:`check_budget`). Raises ValueError naming the field."""
    check_budget(spec.budget)
    for name, param in spec.space.items():
        off = _off_lattice(param)
        if off is not None:  # (a stored spec may hold such values: `values` decide there)
            raise ValueError(
                f"space.{name}: value {off} in `values` is not on the `step` lattice low + k * "
                f"step ({param.low} + k * {param.step}); give `values` or `step`, not both"
            )
        for parent in param.when or {}:
            of = spec.space[parent]
            if isinstance(of, FloatParam) and of.step is None and of.values is None:
                raise ValueError(
                    f"space.{name}.when.{parent}: {parent!r} is a continuous float, which takes "
                    "a listed value almost never; give it a step or values, or make the "
                    "condition on a categorical or int parameter"
                )
    for name, param in spec.space.items():
        if isinstance(param, CategoricalParam):
            clash = _equal_choices(param.choices)
            if clash is not None:  # the models index a choice by ==: True is learnt as 1
                raise ValueError(
                    f"space.{name}.choices: {clash[0]!r} and {clash[1]!r} are equal to Python "
                    "(and to the samplers' models, which would learn one for the other); "
                    "give distinct values, e.g. strings"
                )
    p = spec.pruner
    watched = next((o for o in spec.objectives if o.metric == spec.pruned_metric), None)
    if p.direction is not None and watched is not None and p.direction != watched.direction:
        raise ValueError(
            f"pruner.direction: {p.direction!r} contradicts the objective "
            f"{watched.metric!r} ({watched.direction}); leave it out for an objective"
        )
    if p.type in ("asha", "hyperband") and p.max_steps is not None and p.max_steps < p.min_steps:
        raise ValueError(
            f"pruner.max_steps: {p.max_steps} is below min_steps ({p.min_steps}): no rung fits"
        )


def _equal_choices(choices: Sequence[Any]) -> tuple[Any, Any] | None:
    """Two choices of different types that ``==`` takes as one (``1``, ``True``, ``1.0``)."""
    seen: dict[Any, Any] = {}
    for c in choices:
        first = seen.setdefault(c, c)  # a dict finds 1 under True: equal, and equal hashes
        if type(first) is not type(c):
            return first, c
    return None


def _off_lattice(param: FloatParam | IntParam | CategoricalParam) -> float | None:
    """A value of ``param``'s explicit ``values`` off its ``step`` lattice, or None."""
    if isinstance(param, CategoricalParam) or param.values is None or param.step is None:
        return None
    for v in param.values:
        on = (
            (v - param.low) % param.step == 0
            if isinstance(param, IntParam)
            else _on_lattice(param.low, param.step, v)
        )
        if not on:
            return v
    return None


def load_yaml(text: str, name: str | None = None) -> Any:
    """YAML as a spec is read: ``1e-3`` is a number, as in YAML 1.2 and JSON (PyYAML's YAML
    1.1 reads it as the string "1e-3" without a dot in the mantissa), and a key given twice
    in one mapping is an error (PyYAML keeps the last silently). Raises ValueError, naming
    the file ``name`` where the error is."""
    import yaml

    stream: Any = text
    if name is not None:  # PyYAML names a stream's ``name`` in its errors
        stream = io.StringIO(text)
        stream.name = name
    try:
        return yaml.load(stream, Loader=_spec_loader())  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ValueError(f"the spec is not valid YAML: {exc}") from exc
    except RecursionError:
        where = f" ({name})" if name else ""
        raise ValueError(f"the spec{where} nests too deeply to read") from None


@functools.cache
def _spec_loader() -> type:
    import yaml

    class SpecLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *base": the keys after it override the merged ones
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue  # an unhashable key: the base constructor says why
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"found the key {key_node.value!r} twice",
                        key_node.start_mark,
                    )
            return super().construct_mapping(node, deep=deep)

    # Added after YAML 1.1's own float pattern (which needs a dot), for the same first
    # characters: 1e-3, -2E+5, 3e10.
    SpecLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return SpecLoader


def _pruner_types(pruner: PrunerSpec | None) -> list[str]:
    """The pruner's type and those of the pruners it wraps."""
    types: list[str] = []
    while pruner is not None:
        types.append(pruner.type)
        pruner = pruner.wrapped
    return types


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value


_PARAM_TAGS = {"float", "int", "categorical"}
_UNION_TAGS = {"int", "float", "str", "bool", "none"}
_SCHEDULER_TAGS = {"pbt", "replay"}


# A message that starts with the (dotted) name of the field it is about: "lower: ...".
_NAMED = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[\d+\])*): ")


def describe_errors(exc: ValidationError | list[dict[str, Any]]) -> list[dict[str, str]]:
    """Turn pydantic errors into ``{"field": "space.lr.high", "message": ...}`` items."""
    errors = exc.errors() if isinstance(exc, ValidationError) else exc
    out: list[dict[str, str]] = []
    # A value no member of a union took: pydantic says why for each member; said once here
    # ("Input should be a valid boolean, integer, number or string").
    union_of: dict[str, dict[str, str]] = {}
    for err in errors:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        parts: list[str] = []
        for i, part in enumerate(loc):
            if isinstance(part, int):
                parts.append(f"[{part}]")
            elif i >= 2 and loc[0] == "space" and i == 2 and part in _PARAM_TAGS:
                continue  # the discriminator tag pydantic puts in the path
            elif i == 1 and loc[0] == "scheduler" and part in _SCHEDULER_TAGS:
                continue  # the scheduler's type, which pydantic puts in the path too
            elif i == len(loc) - 1 and part in _UNION_TAGS:
                continue  # the union member pydantic tried
            else:
                parts.append(("." if parts else "") + str(part))
        field = "".join(parts) or "body"
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            field = "body"
            message = f"invalid JSON at character {loc[-1] if loc else '?'}: {message}"
        if err.get("type") == "value_error" and (named := _NAMED.match(message)):
            # a check across fields names the one it refuses first ("max_steps: ..."): the
            # answer's field is that one, not the model holding it
            field = named[1] if field == "body" else f"{field}.{named[1]}"
            message = message[named.end() :]  # the answer puts the field first, once
        if err.get("type") == "scheduler_type":
            field = f"{field}.type"
        if err.get("type") == "missing":
            message = "field required"
        elif err.get("type") in ("extra_forbidden", "unexpected_keyword_argument"):
            message = "unknown field"
        valid = "Input should be a valid "
        if loc and loc[-1] in _UNION_TAGS and message.startswith(valid):
            kinds = union_of.get(field)
            if kinds is not None:  # a further member of a union already reported
                alternatives = kinds["message"].removeprefix(valid).replace(" or ", ", ")
                kinds["message"] = valid + " or ".join([alternatives, message.removeprefix(valid)])
                continue
            union_of[field] = item = {"field": field, "message": message}
            out.append(item)
            continue
        out.append({"field": field, "message": message})
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _looks_like_path(source: str | Path) -> bool:
    if isinstance(source, Path):
        return True
    return "\n" not in source and source.strip().endswith((".yaml", ".yml", ".json"))


def _check_conditions(space: Mapping[str, Any]) -> None:
    for name, param in space.items():
        for parent, allowed in (param.when or {}).items():
            if parent == name:
                raise ValueError(f"{name}.when: a parameter cannot depend on itself")
            if parent not in space:
                raise ValueError(f"{name}.when: {parent!r} is not a parameter of the space")
            possible = _membership(space[parent])
            for value in allowed:
                if not possible(value):
                    raise ValueError(
                        f"{name}.when.{parent}: {value!r} is not a possible value of {parent!r}"
                    )
    _topological_order(space)


def _membership(param: Any) -> Callable[[Any], bool]:
    """``param.contains``, in constant time for a categorical (``when`` lists are checked
    against choices: without this, two long lists cost their product)."""
    if not isinstance(param, CategoricalParam):
        return param.contains
    keys = {_choice_key(c) for c in param.choices}
    return lambda value: _choice_key(value) in keys


def _choice_key(value: Any) -> tuple[Any, Any]:
    # Equal keys exactly when CategoricalParam.contains matches: same type and equal, or both
    # numbers (bools aside) and equal.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("number", value)
    return (type(value), value)


def _topological_order(space: Mapping[str, Any]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, path: Iterable[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join([*path, name])
            raise ValueError(f"conditions form a cycle: {cycle}")
        state[name] = 1
        for parent in space[name].when or {}:
            visit(parent, [*path, name])
        state[name] = 2
        order.append(name)

    for name in space:
        visit(name, [])
    return order
