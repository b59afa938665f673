"""Trial and study state transitions, inside a transaction the caller holds.

The rules live here once: how a trial finishes (and records why), when a failed attempt is
retried, when a study's budget is spent and it completes, how a tell is read and compared.
``StudyService`` calls these; nothing here opens a transaction of its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hpo.service import storage as sql
from hpo.service.db.models import MetricPoint, Study, Trial, utcnow
from hpo.service.errors import BudgetSpent, GridExhausted, InvalidInput
from hpo.service.records import ACTIVE_STATES
from hpo.service.samplers import make_sampler
from hpo.service.samplers.base import Sampler
from hpo.service.spec import StudySpec


@lru_cache(maxsize=256)
def _parse(spec_json: str) -> StudySpec:
    return StudySpec.model_validate_json(spec_json)


@lru_cache(maxsize=64)
def _sampler(spec_json: str) -> Sampler:
    return make_sampler(_parse(spec_json))


def parse_spec(raw: dict[str, Any]) -> StudySpec:
    """A stored spec (JSON) as a StudySpec; parsed once per distinct spec."""
    return _parse(json.dumps(raw))


def spec_of(study: Study) -> StudySpec:
    return parse_spec(study.spec)


def sampler_of(study: Study) -> Sampler:
    """The study's sampler (cached: samplers keep no state between suggestions)."""
    return _sampler(json.dumps(study.spec))


def budget_limit(study: Study, spec: StudySpec) -> float:
    """How many trial numbers the study may hand out (max_trials, capped by a finite grid)."""
    limit = math.inf if spec.budget.max_trials is None else spec.budget.max_trials
    capacity = sampler_of(study).capacity()
    return limit if capacity is None else min(limit, capacity)


def timed_out(study: Study, spec: StudySpec) -> bool:
    """Whether ``budget.timeout_s`` has passed since the study started."""
    if spec.budget.timeout_s is None or study.started_at is None:
        return False
    return utcnow() - study.started_at > timedelta(seconds=spec.budget.timeout_s)


def spent_error(study: Study, spec: StudySpec) -> BudgetSpent:
    """The error that says why no trial is left: grid exhausted or max_trials spent."""
    capacity = sampler_of(study).capacity()
    if capacity is not None and study.next_number >= capacity:
        return GridExhausted(
            f"the grid of study {study.id} is exhausted: all {capacity} points handed out",
            field="sampler",
        )
    return BudgetSpent(
        f"study {study.id} has handed out all {spec.budget.max_trials} trials (budget.max_trials)",
        field="budget.max_trials",
    )


def complete_if_done(s: Session, study: Study) -> None:
    """Mark the study completed once its budget is spent and no trial is active."""
    if study.state not in ("running", "paused"):
        return
    running, waiting = sql.count_active(s, study.id)
    if running or waiting:
        return
    spec = spec_of(study)
    if study.next_number >= budget_limit(study, spec):
        reason = "budget spent" if spec.budget.max_trials else "search space exhausted"
    elif timed_out(study, spec):
        reason = "budget.timeout_s reached"
    else:
        return
    study.state = "completed"
    study.state_reason = reason
    study.finished_at = utcnow()
    sql.touch(study)


def finish(
    s: Session,
    study: Study,
    trial: Trial,
    state: str,
    values: list[float] | None,
    error: str | None,
    *,
    now: datetime | None = None,
) -> None:
    """Finish the trial (complete, pruned or failed), record the event, maybe complete the
    study."""
    now = now or utcnow()
    trial.state = state
    trial.finished_at = now
    trial.lease_expires_at = None
    if values:
        trial.value = values[0] if len(values) == 1 else None
        trial.values = list(values) if len(values) > 1 else None
    if error:
        trial.error = error
    detail = error if state == "failed" else None
    if state == "pruned" and trial.pruned:
        detail = prune_detail(trial.pruned)
    sql.add_event(s, trial, state, detail)
    sql.touch(study, trial, now=now)
    s.flush()
    complete_if_done(s, study)


def fail(s: Session, study: Study, trial: Trial, reason: str, *, retryable: bool) -> None:
    """End the trial's current attempt: back to waiting (same number, attempts + 1) while
    ``max_retries`` allows and the study runs, else failed with ``reason``."""
    spec = spec_of(study)
    if retryable and trial.attempts <= spec.max_retries and study.state == "running":
        sql.add_event(s, trial, "failed", f"attempt {trial.attempts}: {reason}; retrying")
        trial.state = "waiting"
        trial.error = reason
        trial.attempts += 1
        trial.lease_expires_at = None
        sql.add_event(s, trial, "waiting", f"queued for attempt {trial.attempts}")
        sql.touch(study, trial)
        return
    finish(s, study, trial, "failed", None, reason)


def stop_active(s: Session, study: Study) -> None:
    """Fail every running or waiting trial of a study that was stopped."""
    active = s.scalars(
        select(Trial).where(Trial.study_id == study.id, Trial.state.in_(ACTIVE_STATES))
    )
    now = utcnow()
    for trial in active:
        trial.state = "failed"
        trial.error = "study stopped"
        trial.finished_at = now
        trial.lease_expires_at = None
        sql.add_event(s, trial, "failed", "study stopped")
        sql.touch(study, trial, now=now)


def last_watched_value(s: Session, trial: Trial, spec: StudySpec) -> list[float] | None:
    """The objective's newest reported value (a pruned trial's value), single objective only."""
    if spec.multi_objective:
        return None
    value = s.scalar(
        select(MetricPoint.value)
        .where(MetricPoint.trial_id == trial.id, MetricPoint.name == spec.objectives[0].metric)
        .order_by(MetricPoint.step.desc(), MetricPoint.id.desc())
        .limit(1)
    )
    return None if value is None else [value]


def parse_outcome(
    spec: StudySpec, value: float | None, values: Sequence[float] | None, state: str | None
) -> tuple[str, list[float] | None]:
    """Read a tell into (state, values); InvalidInput naming the field when it cannot be."""
    if value is not None and values is not None:
        raise InvalidInput("give either `value` or `values`, not both", field="value")
    vals = [value] if value is not None else (list(values) if values is not None else None)
    state = state or "complete"
    if state not in ("complete", "failed", "pruned"):
        raise InvalidInput(
            f"state must be one of complete, failed, pruned; got {state!r}", field="state"
        )
    if state == "complete" and vals is None:
        raise InvalidInput("a complete trial needs `value` (or `values`)", field="value")
    if state == "failed" and vals is not None:
        raise InvalidInput("a failed trial takes no value", field="value")
    if vals is not None:
        field = "value" if value is not None else "values"
        for i, v in enumerate(vals):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                where = field if field == "value" else f"values[{i}]"
                raise InvalidInput(f"{where} must be a finite number, got {v!r}", field=where)
        if len(vals) != len(spec.objectives):
            raise InvalidInput(
                f"{field}: the study has {len(spec.objectives)} objective(s), got {len(vals)} "
                "value(s)",
                field=field,
            )
        if state == "pruned" and spec.multi_objective:
            vals = None
    return state, [float(v) for v in vals] if vals is not None else None


def same_outcome(trial: Trial, outcome: tuple[str, list[float] | None]) -> bool:
    """Whether a repeated tell says what the finished trial already records."""
    state, vals = outcome
    if trial.state != state:
        return False
    if state == "complete":
        stored = trial.values if trial.values is not None else [trial.value]
        return stored == vals
    return vals is None or (trial.value is not None and [trial.value] == vals)


def finished_message(trial: Trial) -> str:
    """Why a tell on a finished trial conflicts: its state and result."""
    result = ""
    if trial.value is not None:
        result = f" with value {trial.value}"
    elif trial.values is not None:
        result = f" with values {trial.values}"
    elif trial.error:
        result = f" ({trial.error})"
    return f"trial {trial.id} already finished as {trial.state}{result}"


def prune_detail(reason: dict[str, Any]) -> str:
    """A pruned trial's history line: pruner, metric, value, rung or step, threshold."""
    where = (
        f"rung {reason['rung']} (step {reason['step']})"
        if "rung" in reason
        else (f"step {reason.get('step')}")
    )
    return (
        f"{reason.get('pruner')}: {reason.get('metric')} = {reason.get('value'):.6g} at {where}, "
        f"threshold {reason.get('threshold'):.6g}"
    )
