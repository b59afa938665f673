"""The rules of trial and study life cycles, applied inside a transaction the caller holds.

How a trial finishes (and records why), when a failed attempt is retried, when a study's
budget is spent and it completes, how a tell is read and compared. Every state it writes goes
through :mod:`hpo.service.storage.transitions` (checked against the table in
:mod:`hpo.service.states`); every row it reads comes from the storage package. Nothing here
opens a transaction of its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy.orm import Session

from hpo.service import promotions, replay
from hpo.service.db.models import Study, Trial, utcnow
from hpo.service.errors import BudgetSpent, GridExhausted, InvalidInput
from hpo.service.executor import FailureClass
from hpo.service.samplers import make_sampler
from hpo.service.samplers.base import Sampler
from hpo.service.spec import StudySpec
from hpo.service.states import StudyState, TrialState
from hpo.service.storage import events, metrics, studies, trials
from hpo.service.storage.records import parse_spec, spec_of
from hpo.service.storage.transitions import set_study_state, set_trial_state

__all__ = ["parse_spec", "spec_of"]  # re-exported: callers read specs through here too

TELL_STATES = (TrialState.COMPLETE, TrialState.FAILED, TrialState.PRUNED)


@lru_cache(maxsize=64)
def _sampler(spec_json: str) -> Sampler:
    return make_sampler(StudySpec.model_validate_json(spec_json))


def sampler_of(study: Study) -> Sampler:
    """The study's sampler (cached: samplers keep no state between suggestions)."""
    return _sampler(json.dumps(study.spec))


def budget_limit(study: Study, spec: StudySpec) -> float:
    """How many trial numbers the study may hand out (max_trials, capped by a finite grid)."""
    limit = math.inf if spec.max_trials is None else spec.max_trials
    capacity = sampler_of(study).capacity()
    return limit if capacity is None else min(limit, capacity)


def compute_spent(s: Session, study: Study, spec: StudySpec) -> str | None:
    """The compute budget the study has used up (``budget.max_steps``: steps of training
    reported; ``budget.max_worker_seconds``: ranks x seconds of its attempts), or None."""
    limit = spec.budget.max_steps
    if limit is not None and trials.steps_used(s, study.id) >= limit:
        return "budget.max_steps"
    seconds = spec.budget.max_worker_seconds
    if seconds is not None and trials.worker_seconds_used(s, study, utcnow()) >= seconds:
        return "budget.max_worker_seconds"
    return None


def compute_limit(spec: StudySpec, field: str) -> float:
    """The limit set by the compute budget ``field`` (``"budget.max_steps"``, ...)."""
    return getattr(spec.budget, field.removeprefix("budget."))


def compute_spent_error(study: Study, spec: StudySpec, field: str) -> BudgetSpent:
    limit = compute_limit(spec, field)
    return BudgetSpent(f"study {study.id} has used its {field} ({limit:g})", field=field)


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
        f"study {study.id} has handed out all {spec.max_trials} trials (budget.max_trials)",
        field="budget.max_trials",
    )


def complete_if_done(s: Session, study: Study) -> None:
    """Mark the (locked) study completed once its budget is spent and no trial is active
    (nor a paused trial promotable: the next free slot resumes it). Trials still paused then
    are pruned: the study ended without promoting them."""
    if study.state not in (StudyState.RUNNING, StudyState.PAUSED):
        return
    spec = spec_of(study)
    budget = spec.budget
    out_of_time = timed_out(study, spec)
    numbers_spent = study.next_number >= budget_limit(study, spec)
    compute_budget = budget.max_steps is not None or budget.max_worker_seconds is not None
    if not (compute_budget or out_of_time or numbers_spent):
        return  # nothing can be spent yet: no need to count its trials (a tell's usual case)
    running, waiting = studies.count_active(s, study.id)
    if running or waiting:
        return
    if out_of_time:  # first: its running trials may have been ended for it
        reason = "budget.timeout_s reached"
    elif spent := compute_spent(s, study, spec):
        reason = f"{spent} spent"
    elif numbers_spent:
        if promotions.candidates(s, study, spec, final=True):  # none runs or waits (above)
            return
        reason = "budget spent" if spec.max_trials else "search space exhausted"
    else:
        return
    now = utcnow()
    for trial in trials.paused_trials(s, [study.id]):
        finish(
            s,
            study,
            trial,
            TrialState.PRUNED,
            last_watched_value(s, trial, spec),
            None,
            now=now,
            detail=f"paused at step {metrics.step_paused_at(trial.last_step, trial.pause_reason)};"
            f" the study ended ({reason}) without "
            "promoting it",
            complete=False,
        )
    set_study_state(study, StudyState.COMPLETED, reason=reason)


def pause(s: Session, study: Study, trial: Trial, reason: dict[str, Any], *, now: datetime) -> None:
    """Pause the running trial at a rung (its attempt ends; it holds no slot until it is
    promoted), with the pruner's ``reason`` in its history; maybe complete the study. A
    scheduler that owns the attempt keeps owning it until the attempt has ended and its last
    checkpoint is recorded (``StudyService.release_paused``): only then may it be promoted."""
    if reason.get("donor_trial_id") is not None:  # pbt exploit
        donor = reason["donor_trial_id"]
        reason = {**reason, "donor_number": trials.numbers(s, [donor]).get(donor)}
    # the last step of the ranked metric stored as it paused: what a resumed attempt may not
    # report again (reporting.after_pause)
    stored_to = metrics.max_step(s, trial.id, spec_of(study).pruned_metric)
    trial.pause_reason = {**reason, "paused_at": now.isoformat(), "stored_to": stored_to}
    set_trial_state(s, study, trial, TrialState.PAUSED, detail=pause_detail(reason), now=now)
    trial.lease_expires_at = None
    trial.progress_expires_at = None
    s.flush()
    complete_if_done(s, study)


def promote(s: Session, study: Study, trial: Trial, reason: dict[str, Any]) -> None:
    """Queue the paused trial for its next attempt (same number, attempts + 1, not a retry:
    no ``max_retries`` spent), recording why it was promoted."""
    trial.attempts += 1
    trial.error = None
    detail = f"{promotion_detail(reason)}; queued for attempt {trial.attempts}"
    set_trial_state(s, study, trial, TrialState.WAITING, detail=detail)


def fail_paused(s: Session, study: Study, trial: Trial, reason: str) -> None:
    """Fail a paused trial that cannot resume (its checkpoint is missing or unreadable)."""
    finish(s, study, trial, TrialState.FAILED, None, reason)


def _standing(reason: dict[str, Any]) -> str:
    threshold = reason.get("threshold")
    top = f"top {reason.get('promotable')}"
    if threshold is not None:
        top += f" (threshold {threshold:.6g})"
    return (
        f"{reason.get('metric')} = {reason.get('value'):.6g} at rung {reason.get('rung')} "
        f"(step {reason.get('step')}), rank {reason.get('rank')} of {reason.get('of')}, "
        f"promotable: {top}"
    )


def pause_detail(reason: dict[str, Any]) -> str:
    """A paused trial's history line: where it stands in its rung when it paused (PBT: in
    the population at the boundary, and the trial it will copy)."""
    if reason.get("pruner") == "replay":
        return replay.pause_detail(reason)
    if reason.get("pruner") == "pbt" and reason.get("action") == "yield":
        return (
            f"pbt: paused at step {reason.get('step')} (boundary {reason.get('boundary')}): "
            f"{reason.get('behind')} trial(s) wait behind it for a slot"
        )
    if reason.get("pruner") == "pbt":
        return (
            f"pbt exploit: paused: {reason.get('metric')} = {reason.get('value'):.6g} at step "
            f"{reason.get('step')} (boundary {reason.get('boundary')}), rank "
            f"{reason.get('rank')} of {reason.get('of')} (bottom {reason.get('bottom')}): "
            f"will copy trial #{reason.get('donor_number')} "
            f"({reason.get('metric')} = {reason.get('donor_value'):.6g})"
        )
    return f"{reason.get('pruner')} promotion: paused: {_standing(reason)}"


def promotion_detail(reason: dict[str, Any]) -> str:
    """A promoted trial's history line: where it stood in its rung when promoted (PBT: what
    it copied and how its parameters were explored)."""
    if reason.get("pruner") == "replay":
        return replay.promotion_detail(reason)
    if reason.get("pruner") == "pbt":
        segment = reason.get("segment") or {}
        parent = segment.get("parent")
        if parent is None and reason.get("action") == "yield":
            return "pbt: its turn again: resumes its own checkpoint"
        if parent is None:
            return f"pbt: resumes its own checkpoint ({reason.get('note') or 'nothing to copy'})"
        return (
            f"pbt exploit: copies trial #{parent['number']} at step {parent['step']}; "
            f"explored: {segment.get('perturbed')}; params now {segment.get('params')}"
        )
    return f"{reason.get('pruner')} promotion: promoted: {_standing(reason)}"


def finish(
    s: Session,
    study: Study,
    trial: Trial,
    state: TrialState,
    values: list[float] | None,
    error: str | None,
    *,
    now: datetime | None = None,
    detail: str | None = None,
    complete: bool = True,
) -> None:
    """Finish the trial (complete, pruned or failed), record the event (``detail``, else the
    error or the pruning reason), maybe complete the study (unless not ``complete``). Raises
    IllegalTransition when the trial cannot move to ``state``."""
    now = now or utcnow()
    detail = detail or (error if state == TrialState.FAILED else None)
    if state == TrialState.PRUNED and trial.pruned:
        detail = prune_detail(trial.pruned)
    set_trial_state(s, study, trial, state, detail=detail, now=now)
    trial.finished_at = now
    trial.lease_expires_at = None
    trial.progress_expires_at = None
    if values:
        trial.value = values[0] if len(values) == 1 else None
        trial.values = list(values) if len(values) > 1 else None
    if error:
        trial.error = error
    s.flush()
    if complete:
        complete_if_done(s, study)


# Attempts of one trial lost to the infrastructure that are retried without spending
# max_retries; past this many, a loss counts like any other failure (nothing loops forever).
MAX_INFRA_FAILURES = 10


def fail(
    s: Session,
    study: Study,
    trial: Trial,
    reason: str,
    *,
    failure_class: FailureClass = FailureClass.TRAINABLE,
) -> None:
    """End the trial's current attempt. Whether it is retried (back to waiting, same number,
    attempts + 1) depends on ``failure_class`` (see :class:`FailureClass`) and needs a running
    study: ``infrastructure`` is retried without spending ``max_retries`` (counted in
    ``infra_failures``, up to MAX_INFRA_FAILURES), ``trainable`` while ``max_retries``
    allows, ``deterministic`` never. Otherwise the trial fails with ``reason``. The event
    records the class (see :func:`_tag`). A waiting trial is already queued for its next
    attempt: only a failure without retry changes it."""
    kind = FailureClass(failure_class)
    if kind == FailureClass.INFRASTRUCTURE and trial.infra_failures >= MAX_INFRA_FAILURES:
        kind = FailureClass.TRAINABLE  # past the cap, a loss spends a retry like any failure
    if _retried(s, study, trial, kind):
        if trial.state == TrialState.WAITING:
            return
        detail = f"{_tag(kind)}attempt {trial.attempts}: {reason}; retrying"
        events.add(s, trial, TrialState.FAILED, detail)
        if kind == FailureClass.INFRASTRUCTURE:
            trial.infra_failures = (trial.infra_failures or 0) + 1
        trial.error = reason
        trial.attempts += 1
        trial.lease_expires_at = None
        trial.progress_expires_at = None
        trial.owner = None
        set_trial_state(
            s, study, trial, TrialState.WAITING, detail=f"queued for attempt {trial.attempts}"
        )
        return
    detail = f"{_tag(kind)}attempt {trial.attempts}: {reason}" if _tag(kind) else reason
    finish(s, study, trial, TrialState.FAILED, None, reason, detail=detail)


def _tag(kind: FailureClass) -> str:
    """How a failed attempt's event names its class: ``[infrastructure]`` or
    ``[deterministic]`` first; a ``trainable`` failure (counted, the usual case) is untagged."""
    return "" if kind == FailureClass.TRAINABLE else f"[{kind}] "


def _retried(s: Session, study: Study, trial: Trial, kind: FailureClass) -> bool:
    """Whether a failure of ``kind`` sends the trial back to waiting. The attempts counted
    against ``max_retries`` are those that did not begin by a loss of the infrastructure or
    by a resume from a pause (a promotion, a PBT step: one per pause in its history)."""
    if study.state != StudyState.RUNNING or kind == FailureClass.DETERMINISTIC:
        return False
    if kind == FailureClass.INFRASTRUCTURE:
        return True
    counted = trial.attempts - (trial.infra_failures or 0)  # this one included
    limit = spec_of(study).max_retries
    if counted > limit and trial.attempts > 1:  # were some of them resumes?
        counted -= events.count(s, trial.id, TrialState.PAUSED.value)
    return counted <= limit


def stop_active(s: Session, study: Study) -> None:
    """Fail every running, waiting or paused trial of a study that was stopped."""
    now = utcnow()
    for trial in [*trials.active(s, [study.id]), *trials.paused_trials(s, [study.id])]:
        finish(s, study, trial, TrialState.FAILED, None, "study stopped", now=now)


def last_watched_value(s: Session, trial: Trial, spec: StudySpec) -> list[float] | None:
    """The objective's newest reported value (a pruned trial's value), single objective only."""
    if spec.multi_objective:
        return None
    value = metrics.last_value(s, trial.id, spec.objectives[0].metric)
    return None if value is None else [value]


def parse_outcome(
    spec: StudySpec, value: float | None, values: Sequence[float] | None, state: str | None
) -> tuple[TrialState, list[float] | None]:
    """Read a tell into (state, values); InvalidInput naming the field when it cannot be."""
    if value is not None and values is not None:
        raise InvalidInput("give either `value` or `values`, not both", field="value")
    vals = [value] if value is not None else (list(values) if values is not None else None)
    state = state or TrialState.COMPLETE
    if state not in TELL_STATES:
        raise InvalidInput(
            f"state must be one of {', '.join(TELL_STATES)}; got {state!r}", field="state"
        )
    state = TrialState(state)
    if state == TrialState.COMPLETE and vals is None:
        raise InvalidInput("a complete trial needs `value` (or `values`)", field="value")
    if state == TrialState.FAILED and vals is not None:
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
        if state == TrialState.PRUNED and spec.multi_objective:
            vals = None
    return state, [float(v) for v in vals] if vals is not None else None


def same_outcome(trial: Trial, outcome: tuple[TrialState, list[float] | None]) -> bool:
    """Whether a repeated tell says what the finished trial already records."""
    state, vals = outcome
    if trial.state != state:
        return False
    if state == TrialState.COMPLETE:
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
