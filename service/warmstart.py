"""Continuing and warm-starting a study: a raised budget, queued trials, imported trials.

- :func:`reopen_if_budget_left`: a completed study whose budget was raised runs again (the
  ``completed → running`` edge of :mod:`hpo.service.states`).
- :func:`enqueue`: a trial with fixed parameters, queued (``waiting``) so the next ask hands
  it out before any new suggestion (Optuna's ``enqueue_trial``). It takes a trial number: it
  is part of ``max_trials``, which grows when the queue would pass it.
- :func:`import_trials`: finished trials from elsewhere (another study, an Optuna study),
  stored as trials of this one so its samplers learn from them. They do not spend the budget:
  ``max_trials`` grows by their count.
- :func:`set_user_attrs`: free-form JSON attached to a trial.

Every function is one write transaction on the locked study.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from hpo.service import transitions
from hpo.service.db.models import Study, Trial, TrialParam, utcnow
from hpo.service.errors import Conflict, InvalidInput, StudyNotRunning
from hpo.service.records import TrialRecord
from hpo.service.samplers.grid import GridSampler, refuse_off_point
from hpo.service.spec import MAX_COUNT, StudySpec, check_json, check_json_size, is_param_name
from hpo.service.states import ENQUEUED_TRIAL_STATE, StudyState, TrialState
from hpo.service.storage import Storage, events, studies, trials
from hpo.service.storage.records import trial_record
from hpo.service.storage.transitions import set_study_state

# Trials one import may carry (README "Limits").
MAX_IMPORT = 10_000


@dataclass(frozen=True)
class FinishedTrial:
    """A finished trial to import: its parameters and outcome."""

    params: dict[str, Any]
    state: str = TrialState.COMPLETE.value
    value: float | None = None
    values: list[float] | None = None
    user_attrs: dict[str, Any] = field(default_factory=dict)


def reopen_if_budget_left(s: Session, study: Study) -> Conflict | None:
    """Run a completed (locked) study again when its budget has room for another trial or a
    queued trial waits. Returns, for a study that stays completed, the Conflict that says
    why, naming the field that keeps it so: ``budget.timeout_s`` (its time ran out), a
    compute budget it has used (``budget.max_steps``, ``budget.max_worker_seconds``),
    ``budget.max_trials`` (every number handed out), ``sampler`` (every point of its grid);
    None otherwise. The caller raises it when its change was meant to run the study again."""
    if study.state != StudyState.COMPLETED:
        return None
    spec = transitions.spec_of(study)
    stays = f"study {study.id} stays completed: "
    if transitions.timed_out(study, spec):
        assert study.started_at is not None  # timed_out says so
        elapsed = (utcnow() - study.started_at).total_seconds()
        return Conflict(
            f"{stays}its budget.timeout_s ({spec.budget.timeout_s:g} s) has passed, "
            f"{elapsed:.0f} s since it started; raise budget.timeout_s above that to run it "
            "again",
            field="budget.timeout_s",
        )
    if spent := transitions.compute_spent(s, study, spec):
        limit = transitions.compute_limit(spec, spent)
        return Conflict(
            f"{stays}its {spent} ({limit:g}) is used; raise {spent} to run it again",
            field=spent,
        )
    limit = transitions.budget_limit(study, spec)
    _, waiting = studies.count_active(s, study.id)
    if study.next_number < limit or waiting:
        set_study_state(study, StudyState.RUNNING, reason=f"budget raised to {limit:g} trials")
        return None
    capacity = transitions.sampler_of(study).capacity()
    if capacity is not None and study.next_number >= capacity:
        return Conflict(
            f"{stays}all {capacity} points of its grid were handed out; no budget runs it again",
            field="sampler",
        )
    return Conflict(
        f"{stays}its {study.next_number} trials (budget.max_trials) were all handed out; raise "
        "budget.max_trials to run it again",
        field="budget.max_trials",
    )


def grow_budget(study: Study, *, at_least: int | None = None, by: int = 0) -> None:
    """Raise the (locked) study's ``max_trials`` to ``at_least`` or by ``by`` (a study with
    no ``max_trials`` is left unbounded)."""
    budget = dict(study.spec.get("budget") or {})
    current = budget.get("max_trials")
    if current is None:
        return
    new = max(current + by, at_least or 0)
    if new > MAX_COUNT:  # grown no further than a count JSON holds exactly
        new = max(current, MAX_COUNT)
    if new != current:
        budget["max_trials"] = new
        study.spec = {**study.spec, "budget": budget}


def difference(stored: StudySpec, wanted: StudySpec) -> str | None:
    """What of ``wanted`` a study with ``stored`` cannot be loaded as (``load_if_exists``):
    its objectives, a parameter's domain, its trainable; None when it can. A define-by-run
    study may have learned more parameters than ``wanted`` names; the budget, sampler and
    pruner may differ (a loaded study keeps its own)."""
    if [o.model_dump() for o in stored.objectives] != [o.model_dump() for o in wanted.objectives]:
        have = ", ".join(f"{o.metric} {o.direction}" for o in stored.objectives)
        asked = ", ".join(f"{o.metric} {o.direction}" for o in wanted.objectives)
        return f"objective (stored: {have}; asked: {asked})"
    for name, param in wanted.space.items():
        if name not in stored.space:
            return f"space.{name} (not in the stored space)"
        if _typed(stored.space[name].model_dump()) != _typed(param.model_dump()):
            return f"space.{name} (stored: {stored.space[name].model_dump(exclude_defaults=True)})"
    if not stored.define_by_run:
        extra = sorted(set(stored.space) - set(wanted.space))
        if extra:
            return f"space.{extra[0]} (in the stored space, not in the one asked)"
    if stored.trainable != wanted.trainable:
        return "trainable"
    return None


def _typed(value: Any) -> Any:
    """``value`` with each boolean tagged, so that comparing two domains tells ``true`` from
    ``1`` (Python's ``True == 1``) as every other check of a value does."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return value


def check_given_params(spec: StudySpec, params: Mapping[str, Any], where: str = "params") -> None:
    """Refuse (InvalidInput naming ``params.<name>``) a parameter the space does not have or a
    value outside its domain. A define-by-run study accepts names its space does not know yet
    (the trial's first suggest of one refuses a value of another kind; a number outside the
    range asked for is used, as Optuna uses an enqueued one)."""
    for name, value in params.items():
        param = spec.space.get(name)
        if param is None:
            if spec.define_by_run and is_param_name(name):
                _check_json_value(value, f"{where}.{name}")
                continue
            if spec.define_by_run:
                shown = f"{where}.{name[:128]!r}" + ("..." if len(name) > 128 else "")
                raise InvalidInput(
                    f"{shown}: a parameter name is a letter or _, then up to 127 letters, "
                    "digits, _ . or -",
                    field=shown,
                )
            raise InvalidInput(
                f"{where}.{name}: not a parameter of this study's space "
                f"({', '.join(spec.space) or 'empty'})",
                field=f"{where}.{name}",
            )
        if not param.contains(value):
            whole = isinstance(value, float) and value.is_integer() and param.type == "int"
            why = (
                "is not an integer (an int parameter takes 3, not 3.0)"
                if whole
                else ("lies outside its domain")
            )
            raise InvalidInput(f"{where}.{name}: {value!r} {why}", field=f"{where}.{name}")


def _check_json_value(value: Any, where: str) -> None:
    if isinstance(value, (dict, list)) or not (
        value is None or isinstance(value, (bool, int, float, str))
    ):
        raise InvalidInput(
            f"{where}: a parameter value is a number, string, bool or null", field=where
        )
    try:
        check_json(value, where)
    except ValueError as exc:
        raise InvalidInput(str(exc), field=where) from exc


def enqueue(storage: Storage, study_id: int, params: Mapping[str, Any]) -> TrialRecord:
    """Queue a trial with ``params`` (a partial assignment is completed by the sampler when
    it is asked); it is handed out before any new suggestion. Raises StudyNotFound,
    StudyNotRunning (stopped), InvalidInput naming the parameter, Conflict (nothing queued)
    for a completed study whose time or compute budget is spent."""
    with storage.write() as s:
        study = studies.get(s, study_id, lock=True)
        spec = transitions.spec_of(study)
        _refuse_stopped(study, "enqueue a trial")
        if spec.replay is not None:
            raise InvalidInput(
                "params: a replay study's trials take the parameters of its schedule "
                "(scheduler.schedule); it queues no others",
                field="params",
            )
        check_given_params(spec, params)
        if not spec.define_by_run:
            try:
                params = spec.check_params(params)
            except ValueError as exc:
                raise InvalidInput(str(exc), field=str(exc).split(":", 1)[0]) from exc
        _refuse_off_grid(study, study.next_number, params, "params")
        now = utcnow()
        trial = Trial(
            study_id=study.id,
            number=study.next_number,
            state=ENQUEUED_TRIAL_STATE.value,
            attempts=1,
            created_at=now,
            suggestion={"sampler": "enqueued", "fixed": sorted(params)},
        )
        trial.params = [
            TrialParam(name=n, position=i, value=v) for i, (n, v) in enumerate(params.items())
        ]
        study.next_number += 1
        s.add(trial)
        studies.touch(study, trial, now=now)
        s.flush()
        events.add(s, trial, ENQUEUED_TRIAL_STATE, "enqueued with fixed parameters")
        grow_budget(study, at_least=study.next_number)
        s.flush()
        if (held := reopen_if_budget_left(s, study)) is not None:
            raise held  # rolled back: a trial queued in a study that never runs it again
        return trial_record(trial)


def import_trials(
    storage: Storage, study_id: int, finished: Sequence[FinishedTrial]
) -> list[TrialRecord]:
    """Store finished trials (complete with their value(s), pruned or failed) as new trials of
    the study; its samplers learn from them on the next ask. Raises StudyNotFound,
    StudyNotRunning (stopped), InvalidInput naming ``trials[i]...``."""
    if len(finished) > MAX_IMPORT:
        raise InvalidInput(f"trials: at most {MAX_IMPORT} per import", field="trials")
    with storage.write() as s:
        study = studies.get(s, study_id, lock=True)
        spec = transitions.spec_of(study)
        _refuse_stopped(study, "import trials")
        outcomes = [_checked(spec, i, t) for i, t in enumerate(finished)]
        for i, t in enumerate(finished):
            _refuse_off_grid(study, study.next_number + i, t.params, f"trials[{i}].params")
        grow_budget(study, by=len(finished))
        out = [
            _insert_finished(s, study, spec, t, o) for t, o in zip(finished, outcomes, strict=True)
        ]
        transitions.complete_if_done(s, study)
        return [trial_record(t) for t in out]


def _refuse_off_grid(study: Study, number: int, params: Mapping[str, Any], where: str) -> None:
    """On a grid study, trial ``number`` must be grid point ``number`` (see
    :func:`~hpo.service.samplers.grid.refuse_off_point`); GridExhausted past the grid."""
    sampler = transitions.sampler_of(study)
    if isinstance(sampler, GridSampler):
        refuse_off_point(sampler.point(number), number, params, where, whole=True)


def _checked(spec: StudySpec, i: int, t: FinishedTrial) -> tuple[TrialState, list[float] | None]:
    where = f"trials[{i}]"
    check_given_params(spec, t.params, where=f"{where}.params")
    if not spec.define_by_run and t.state != TrialState.FAILED:  # a failure may come early
        # A warm start may come from a study with fewer parameters (missing ones are kept
        # missing), but a result names some of them, and none that its values make inactive.
        if spec.space and not t.params:
            raise InvalidInput(
                f"{where}.params: a {t.state} trial names none of the study's parameters "
                f"({', '.join(spec.space)})",
                field=f"{where}.params",
            )
        for name in t.params:
            missing = [p for p in spec.space[name].when or {} if p not in t.params]
            if missing or not spec.is_active(name, t.params):
                why = f"needs its parent {missing[0]}" if missing else "inactive under its parents"
                raise InvalidInput(f"{where}.params.{name}: {why}", field=f"{where}.params.{name}")
    if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAILED):
        raise InvalidInput(
            f"{where}.state: an imported trial is complete, pruned or failed, not {t.state!r}",
            field=f"{where}.state",
        )
    try:
        check_json(t.user_attrs, f"{where}.user_attrs")
        check_json_size(t.user_attrs, f"{where}.user_attrs")
        return transitions.parse_outcome(spec, t.value, t.values, t.state)
    except (InvalidInput, ValueError) as exc:
        message = exc.message if isinstance(exc, InvalidInput) else str(exc)
        raise InvalidInput(f"{where}: {message}", field=where) from exc


def _insert_finished(
    s: Session,
    study: Study,
    spec: StudySpec,
    t: FinishedTrial,
    outcome: tuple[TrialState, list[float] | None],
) -> Trial:
    now = utcnow()
    trial = trials.insert(
        s,
        study,
        study.next_number,
        dict(t.params),
        {"sampler": "imported"},
        lease_s=spec.lease_s,
        now=now,
    )
    trial.user_attrs = dict(t.user_attrs) or None
    state, values = outcome
    transitions.finish(s, study, trial, state, values, None, now=now, detail="imported")
    return trial


def set_user_attrs(storage: Storage, trial_id: int, attrs: Mapping[str, Any]) -> TrialRecord:
    """Merge ``attrs`` into the trial's user attributes (any state). Raises TrialNotFound,
    InvalidInput (not JSON, too large)."""
    with storage.write() as s:
        study, trial = trials.lock(s, trial_id)
        merged = {**(trial.user_attrs or {}), **attrs}
        try:
            check_json(merged, "user_attrs")
            check_json_size(merged, "user_attrs")
        except ValueError as exc:
            raise InvalidInput(str(exc), field="user_attrs") from exc
        trial.user_attrs = merged
        studies.touch(study, trial)
        return trial_record(trial)


def _refuse_stopped(study: Study, what: str) -> None:
    if study.state == StudyState.STOPPED:
        raise StudyNotRunning(f"study {study.id} is stopped; cannot {what}", field="state")
