"""Parameters a trial names while it runs (Optuna's define-by-run), over REST.

A study with ``define_by_run: true`` hands out trials whose ``params`` hold only what was
fixed for them (enqueued, or given to the ask); the sampler's joint suggestion over the space
known so far is kept aside as the trial's *proposal* (``suggestion.proposed``). When the
running trial suggests a parameter (:func:`suggest`):

- a value it already has (fixed, or suggested before: a repeat is answered the same) is
  returned;
- a parameter the space does not know yet is learned: added to the study's ``space`` as the
  trial describes it, so every later ask samples it jointly with the rest;
- a parameter the space knows, asked with the same kind of domain, takes the proposal's value
  when it lies in the domain asked for; otherwise (first use, a narrower range) it is sampled
  independently from the finished trials that have it, as Optuna's samplers do for a
  parameter outside their joint search space (TPE for a TPE study, random otherwise);
- a range wider than the space holds (a bound moved out, as after a search hit it) is sampled
  independently over the range asked for, and widens the study's space to cover both, so
  later trials search all of it (the proposal, made over the old range, would never leave it).

A parameter asked with a different kind of domain than the space holds (an int where a float
was learned, other choices) is refused (InvalidInput), as Optuna refuses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from hpo.service import transitions
from hpo.service.db.models import TrialParam
from hpo.service.errors import Conflict, InvalidInput
from hpo.service.samplers.base import Suggestion
from hpo.service.spec import CategoricalParam, FloatParam, IntParam, Param, StudySpec
from hpo.service.states import TrialState
from hpo.service.storage import Storage, studies, trials

_PARAM = TypeAdapter(Param)
AnyParam = FloatParam | IntParam | CategoricalParam


def parse_param(raw: Mapping[str, Any], name: str) -> AnyParam:
    """A parameter's domain as a trial describes it; InvalidInput naming ``param.<field>``."""
    try:
        param = _PARAM.validate_python(dict(raw))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"][1:] if p not in ("float", "int", "categorical"))
        where = f"param.{loc}" if loc else "param"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise InvalidInput(f"{name}: {where}: {msg}", field=where) from exc
    if param.when:
        raise InvalidInput(
            f"{name}: a parameter suggested at run time has no `when`", field="param.when"
        )
    return param


def same_kind(a: AnyParam, b: AnyParam) -> bool:
    """Whether two domains are of one kind (Optuna's distribution compatibility)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, CategoricalParam):
        return a.choices == b.choices
    return a.log == b.log


def proposal(spec: StudySpec, suggestion: Suggestion, fixed: Mapping[str, Any]) -> Suggestion:
    """A define-by-run trial's suggestion: only the ``fixed`` parameters, the sampler's joint
    values kept aside as ``proposed``."""
    info = {**suggestion.info, "proposed": dict(suggestion.params)}
    return Suggestion(dict(fixed), info)


def suggest(storage: Storage, trial_id: int, name: str, raw: Mapping[str, Any]) -> Any:
    """The value of parameter ``name`` for the running trial (see the module docstring).
    Raises TrialNotFound, InvalidInput (bad domain, a different kind than the space holds),
    Conflict (the study is not define-by-run, or the trial is not running)."""
    param = parse_param(raw, name)
    with storage.read() as s:
        study, trial = _read(s, trial_id)
        spec = transitions.spec_of(study)
        have = {p.name: p.value for p in trial.params}
        proposed = dict((trial.suggestion or {}).get("proposed") or {})
        known = spec.space.get(name)
        _check(spec, trial, name, param, known)
        widens = known is not None and _union(spec, known, param) is not known
        if name in have:
            value = have[name]
            # Suggested before: the same value again, as Optuna answers (the space, which
            # only widens, holds it). Else fixed when the trial was asked or queued, maybe
            # before the space knew the name: a number outside the range asked for is used,
            # as Optuna uses an enqueued one; a value of another kind is refused.
            if known is not None and known.contains(value):
                return value
            if not _fits_kind(param, value):
                raise InvalidInput(
                    f"{name}: this trial's value {value!r} (fixed when it was asked or "
                    f"queued) is not a value of {_describe(param)}",
                    field="param",
                )
            learn = known is None or (param.contains(value) and widens)
            return _store(storage, trial_id, name, param, value, learn=learn)
        value = proposed.get(name)
        if known is None or value is None or not param.contains(value) or widens:
            history = _history(s, study, spec, name)
            value = _independent(spec, name, param, history, trial.number)
    return _store(storage, trial_id, name, param, value, learn=known is None or widens)


def _fits_kind(param: AnyParam, value: Any) -> bool:
    """Whether a fixed ``value`` is of ``param``'s kind: one of its choices (or listed
    ``values``), an integer for an int, a finite number for a float (a number outside the
    range is still used)."""
    if isinstance(param, CategoricalParam) or param.values is not None:
        return param.contains(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) if isinstance(param, IntParam) else math.isfinite(value)


def _read(s: Any, trial_id: int) -> tuple[Any, Any]:
    trial = trials.get_trial(s, trial_id)
    return studies.get(s, trial.study_id), trial


def _check(spec: StudySpec, trial: Any, name: str, param: AnyParam, known: Any) -> None:
    if not spec.define_by_run and known is None:
        raise InvalidInput(
            f"{name}: not a parameter of this study's space; a study takes parameters named at "
            "run time only with define_by_run: true",
            field="name",
        )
    if known is None and spec.sampler.type == "grid":
        raise InvalidInput(
            f"{name}: not a parameter of this study's grid ({', '.join(spec.space)})",
            field="name",
        )
    if trial.state != TrialState.RUNNING:
        raise Conflict(f"trial {trial.id} is {trial.state}, not running", field="trial_id")
    if known is not None and not same_kind(known, param) and spec.sampler.type != "grid":
        raise InvalidInput(
            f"{name}: the study knows it as {_describe(known)}; a trial asked for "
            f"{_describe(param)} (a parameter keeps one kind of domain)",
            field="param",
        )


def _union(spec: StudySpec, known: AnyParam, asked: AnyParam) -> AnyParam:
    """``known`` widened to cover the range ``asked`` (from the lower low to the higher high),
    or ``known`` itself when it covers it already or cannot be widened: a grid's (its points
    are handed out by number), categorical choices, explicit values, another kind of domain,
    a float lattice, an int lattice the asked bounds are not on."""
    if (
        spec.sampler.type == "grid"
        or not same_kind(known, asked)
        or isinstance(known, CategoricalParam)
        or known.values is not None
        or asked.values is not None
        or (known.contains(asked.low) and known.contains(asked.high))
    ):
        return known
    if isinstance(known, FloatParam) and (known.step is not None or asked.step is not None):
        return known
    if isinstance(known, IntParam) and (
        asked.step != known.step or (asked.low - known.low) % known.step != 0
    ):
        return known
    low, high = min(known.low, asked.low), max(known.high, asked.high)
    return known.model_copy(update={"low": low, "high": high})


def _describe(p: AnyParam) -> str:
    if isinstance(p, CategoricalParam):
        return f"categorical {p.choices}"
    domain = f"values {p.values}" if p.values is not None else f"[{p.low!r}, {p.high!r}]"
    step = f", step {p.step!r}" if p.step is not None and p.values is None else ""
    return f"{p.type} {domain}{' (log)' if p.log else ''}{step}"


def _history(s: Any, study: Any, spec: StudySpec, name: str) -> list[tuple[Any, tuple[float, ...]]]:
    """(value of ``name``, objective values) of the study's complete trials that have it."""
    out = []
    for t in trials.observed(s, study, spec.pruned_metric):
        if t.state == TrialState.COMPLETE and t.values is not None and name in t.params:
            out.append((t.params[name], t.values))
    return out


def _independent(spec: StudySpec, name: str, param: AnyParam, history: list, number: int) -> Any:
    """Sample ``name`` on its own, as Optuna's sampler of the same kind would."""
    import numpy as np
    import optuna

    from hpo.service.samplers._optuna import distribution

    seed = None
    if spec.sampler.seed is not None:
        salt = [spec.sampler.seed, number, *name.encode()]
        seed = int(np.random.SeedSequence(salt).generate_state(1)[0])
    if spec.sampler.type == "tpe":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=spec.sampler.n_startup_trials
        )
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    dist = distribution(param)
    study = optuna.create_study(sampler=sampler, directions=[o.direction for o in spec.objectives])
    for value, values in history:
        if _inside(dist, value):
            study.add_trial(
                optuna.trial.create_trial(
                    params={name: value}, distributions={name: dist}, values=list(values)
                )
            )
    return study.ask(fixed_distributions={name: dist}).params[name]


def _inside(dist: Any, value: Any) -> bool:
    """Whether an earlier value lies in the domain asked for now (others are left out)."""
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def _store(
    storage: Storage, trial_id: int, name: str, param: AnyParam, value: Any, *, learn: bool
) -> Any:
    """Record ``value`` for the trial (the first one stored wins) and, with ``learn`` (the
    space lacked ``param`` or did not cover it when read), learn it into the study's space
    when it is new there, or widen the space's range to cover it. (A space only gains names
    and widens: one that covered ``param`` when read still does.)"""
    with storage.write() as s:
        study, trial = trials.lock(s, trial_id)
        held = {p.name: p.value for p in trial.params}
        if name in held and (held[name] != value or not learn):
            return held[name]  # another suggest stored it first (and learned its domain)
        if trial.state != TrialState.RUNNING:
            raise Conflict(f"trial {trial.id} is {trial.state}, not running", field="trial_id")
        if learn:
            stored = transitions.spec_of(study)
            known = stored.space.get(name)
            learned = param if known is None else _union(stored, known, param)
            if learned is not known:  # new to the space, or a range it widens
                space = {
                    **(study.spec.get("space") or {}),
                    name: learned.model_dump(mode="json", exclude_defaults=True),
                }
                spec = {**study.spec, "space": space}
                StudySpec.model_validate(spec)
                study.spec = spec
        if name not in held:  # else: a value fixed when it was asked, its domain learned now
            trial.params.append(TrialParam(name=name, position=len(trial.params), value=value))
        studies.touch(study, trial)
        return value
