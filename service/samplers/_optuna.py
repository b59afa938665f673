"""Drive an Optuna sampler from our stored trials (Optuna is the engine, we keep the state).

Each suggestion opens a throw-away Optuna study over a :class:`ViewStorage`: a read-only window
onto the observed trials that serves them as given (no copy per trial), plus the one trial
being asked. Pending (running or waiting) trials go in as RUNNING so samplers that know about
them (TPE's constant liar) spread parallel asks apart. A trial's Optuna number is its own
number, so the order Optuna sees does not depend on which trials were left out.

Finished trials are converted once (:func:`frozen_trial`) and kept between asks by
:mod:`hpo.service.histories`; they are shared read-only by concurrent asks.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Container, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.search_space import IntersectionSearchSpace
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

from hpo.service.samplers.base import ObservedTrial, Sampler, StudyView
from hpo.service.spec import CategoricalParam, FloatParam, IntParam, StudySpec, lattice_point

optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

_STUDY_ID = 0
# The only states a view's trials have (pending ones are RUNNING, or COMPLETE under a lie).
_HELD = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
_STUDY_NAME = "hpo-view"
_CONSTRAINTS = "constraints"  # optuna.study._constrained_optimization._CONSTRAINTS_KEY


def distribution(param: FloatParam | IntParam | CategoricalParam) -> BaseDistribution:
    """The Optuna distribution of one of our parameters."""
    if isinstance(param, CategoricalParam):
        return CategoricalDistribution(param.choices)
    if param.values is not None:
        return CategoricalDistribution(list(param.values))
    if isinstance(param, IntParam):
        return IntDistribution(param.low, param.high, log=param.log, step=param.step)
    step = None if param.step is None else float(param.step)
    high = param.high
    if step is not None:  # Optuna wants high on the lattice, as the decimals read
        n = int((param.high - param.low) / step + 1e-9)
        high = lattice_point(param.low, step, n)  # 0 + 3 * 0.3 is 0.9, not 0.8999...
    return FloatDistribution(float(param.low), float(high), log=param.log, step=step)


class OptunaBacked(Sampler):
    """A sampler on Optuna's: it keeps each finished trial as an Optuna FrozenTrial between
    asks."""

    def prepare(self, trial: ObservedTrial) -> FrozenTrial | None:
        """The trial as an Optuna FrozenTrial (see :func:`frozen_trial`: None for one Optuna
        would not learn from), made once per finished trial."""
        return frozen_trial(self.spec, trial)


def _as_objective(spec: StudySpec, intermediate: Mapping[int, float]) -> dict[int, float]:
    """A pruned trial's reports of the pruner's metric as Optuna ranks them, by the
    objective's direction: negated where the two directions differ (accuracy pruned while a
    loss is minimised), or the trials with the worst accuracy were learnt as the best."""
    if spec.multi_objective or spec.pruner_direction == spec.objectives[0].direction:
        return dict(intermediate)
    return {step: -value for step, value in intermediate.items()}


def frozen_trial(
    spec: StudySpec, trial: ObservedTrial, lie: tuple[float, ...] | None = None
) -> FrozenTrial | None:
    """Our trial as an Optuna FrozenTrial numbered as ours, or None if Optuna should not see
    it. The result is shared between asks: nothing may change it afterwards."""
    dists = {n: distribution(spec.space[n]) for n in trial.params if n in spec.space}
    params = {n: v for n, v in trial.params.items() if n in dists}
    if trial.state == "complete" and trial.values is not None:
        state, values = TrialState.COMPLETE, list(trial.values)
    elif trial.state == "pruned":
        state, values = TrialState.PRUNED, None
    elif trial.state in ("running", "waiting"):
        state, values = (TrialState.RUNNING, None) if lie is None else (TrialState.COMPLETE, lie)
    else:
        return None
    attrs = dict(trial.kept)
    if spec.constraints and trial.state in ("complete", "pruned"):
        # Optuna reads a trial's constraints from these keys (Trial.set_constraint); a metric
        # never reported is inf here, made finite per ask by _fill_constraints.
        violations = spec.violations(trial.values, trial.metrics)
        attrs.update({f"{_CONSTRAINTS}:{i}": v for i, v in enumerate(violations)})
    try:
        frozen = optuna.trial.create_trial(
            state=state,
            values=values,
            params=params,
            distributions=dists,
            intermediate_values=_as_objective(spec, trial.intermediate),
            system_attrs=attrs,
        )
    except ValueError:  # a value outside a distribution after a spec edit: leave it out
        return None
    frozen.number = trial.number
    frozen._trial_id = trial.number
    return frozen


class ViewStorage(BaseStorage):
    """One study's trials served from a list, as Optuna's samplers read them, without copies.

    ``trials`` (FrozenTrials in number order, numbered and identified as ours) are never
    written; the only trial that changes is the one :meth:`create_new_trial` adds (number
    ``number``), which receives the suggested parameters. One instance serves one ask.
    """

    def __init__(
        self, directions: Sequence[StudyDirection], trials: list[FrozenTrial], number: int
    ) -> None:
        self._directions = list(directions)
        self._trials = trials
        self._number = number
        self._new: FrozenTrial | None = None
        # Study attributes a sampler writes during the ask (NSGA-II's parent cache): kept
        # for this ask only, so the sampler recomputes them from the trials on the next.
        self._study_attrs: dict[str, Any] = {}
        # Set by :func:`suggest` for samplers that read them instead of filtering ``trials``:
        # the pending trials (RUNNING, in number order) and how many trials are finished.
        self.running: list[FrozenTrial] | None = None
        self.finished: int | None = None

    # -- the study
    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        raise NotImplementedError("a view holds exactly one study")

    def delete_study(self, study_id: int) -> None:
        raise NotImplementedError("a view is read-only")

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        raise NotImplementedError("a view is read-only")

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._study_attrs[key] = value

    def get_study_id_from_name(self, study_name: str) -> int:
        return _STUDY_ID

    def get_study_name_from_id(self, study_id: int) -> str:
        return _STUDY_NAME

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return list(self._directions)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return {}

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return dict(self._study_attrs)

    def get_all_studies(self) -> list[FrozenStudy]:
        return [
            FrozenStudy(
                study_name=_STUDY_NAME,
                direction=None,
                directions=self._directions,
                user_attrs={},
                system_attrs=dict(self._study_attrs),
                study_id=_STUDY_ID,
            )
        ]

    # -- trials
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if self._new is not None or template_trial is not None:
            raise NotImplementedError("a view asks exactly one new trial")
        self._new = FrozenTrial(
            number=self._number,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.now(timezone.utc),
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
            trial_id=self._number,
        )
        self._trials = [*self._trials, self._new]
        return self._number

    def _asked(self, trial_id: int) -> FrozenTrial:
        if self._new is None or trial_id != self._new._trial_id:
            raise NotImplementedError("only the asked trial of a view can be written")
        return self._new

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        trial = self._asked(trial_id)
        trial.params[param_name] = distribution.to_external_repr(param_value_internal)
        trial.distributions[param_name] = distribution

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return trial_number

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        raise NotImplementedError("a view is read-only")

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        raise NotImplementedError("a view is read-only")

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._asked(trial_id).user_attrs[key] = value

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._asked(trial_id).system_attrs[key] = value

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if self._new is not None and trial_id == self._new._trial_id:
            return self._new
        for trial in self._trials:
            if trial._trial_id == trial_id:
                return trial
        raise KeyError(trial_id)

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        if states is None:
            trials = list(self._trials)
        elif not any(s in states for s in _HELD):
            trials = []  # e.g. Optuna's ask looking for WAITING trials: a view holds none
        else:
            trials = [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials


def suggest(
    sampler: optuna.samplers.BaseSampler,
    view: StudyView,
    *,
    lie: tuple[float, ...] | None = None,
) -> tuple[dict[str, Any], int]:
    """Ask ``sampler`` for the next parameters given ``view``; returns them and the trials used.

    Finished trials come from ``view.prepared`` where it holds them (made once, kept between
    asks); the others are converted here.
    """
    params, observed, _ = suggest_keeping(sampler, view, lie=lie)
    return params, observed


def suggest_keeping(
    sampler: optuna.samplers.BaseSampler,
    view: StudyView,
    *,
    lie: tuple[float, ...] | None = None,
) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """As :func:`suggest`, with the system attributes the sampler set on the asked trial
    (what a sampler with ``keeps_state`` stores and hands back in ``ObservedTrial.kept``)."""
    spec = view.spec
    # Only the trials without a prepared form are converted here, and found without a
    # Python step per trial (this runs on every ask of studies of 10,000s of trials).
    missing = view.unprepared
    made = list(view.prepared) if view.prepared is not None else [None] * len(view.trials)
    for i in missing:
        made[i] = frozen_trial(spec, view.trials[i], lie)
    converted = [f for i in missing if (f := made[i]) is not None]
    frozen = made if len(converted) == len(missing) else [f for f in made if f is not None]
    if spec.constraints:
        frozen = _fill_constraints(frozen, len(spec.constraints))
    # Prepared forms are finished trials (Sampler.prepare sees only those); count the rest.
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    observed = len(made) - len(missing) + sum(f.state in done for f in converted)
    directions = [StudyDirection[o.direction.upper()] for o in spec.objectives]
    storage = ViewStorage(directions, frozen, view.number)
    storage.running = [f for f in converted if f.state == TrialState.RUNNING]
    storage.finished = observed
    study = optuna.Study(study_name=_STUDY_NAME, storage=storage, sampler=sampler)
    # Lies make pending trials look finished: nothing learnt from them may be kept.
    memo = view.memo if lie is None else None
    search = _resume_intersection(sampler, memo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = study.ask()
        params: dict[str, Any] = {}
        for name in spec.parameter_order():
            if spec.is_active(name, params):
                params[name] = _suggest_one(trial, name, spec.space[name])
    if search is not None and memo is not None:
        memo[_INTERSECTION] = (search._search_space, search._cached_trial_number)
    kept = dict(storage._new.system_attrs) if storage._new is not None else {}
    return params, observed, kept


def _fill_constraints(trials: list[FrozenTrial], n: int) -> list[FrozenTrial]:
    """The trials with every constraint finite, for Optuna's samplers (GP fits a model to
    them; every trial but a running one must have all of them): a violation that is inf (the
    metric never reported) becomes the worst one seen plus their spread, and a pending trial
    counted as complete (a constant liar's lie) takes the mean ones. Filled trials are
    copies: the others are shared between asks."""
    keys = [f"{_CONSTRAINTS}:{i}" for i in range(n)]
    seen = [
        [t.system_attrs[k] for t in trials if math.isfinite(t.system_attrs.get(k, math.inf))]
        for k in keys
    ]
    worst = [max(v) + (max(v) - min(v)) + 1.0 if v else 1.0 for v in seen]
    mean = [math.fsum(x / len(v) for x in v) if v else 0.0 for v in seen]
    out = []
    for t in trials:
        if t.state == TrialState.RUNNING or all(
            math.isfinite(t.system_attrs.get(k, math.inf)) for k in keys
        ):
            out.append(t)
            continue
        t = copy.copy(t)
        t._system_attrs = dict(t.system_attrs)
        for i, k in enumerate(keys):
            if k not in t.system_attrs:
                t._system_attrs[k] = mean[i]
            elif not math.isfinite(t.system_attrs[k]):
                t._system_attrs[k] = worst[i]
        out.append(t)
    return out


_INTERSECTION = "optuna.intersection"


def _resume_intersection(
    sampler: optuna.samplers.BaseSampler, memo: dict[str, Any] | None
) -> IntersectionSearchSpace | None:
    """TPE's intersection search space, resumed from where an earlier ask of the study left
    it; None when the sampler has none.

    Optuna computes it incrementally in a sampler that lives as long as its study: it walks
    the trials from the newest back to the first one it has not seen finished. Ours live for
    one ask, so without this the walk covers every trial on every ask (O(n) comparisons of
    distributions). The state kept is the intersection over the finished trials numbered
    below a cursor that stops at the oldest pending trial; finished trials never change, so
    resuming from it yields what the full walk yields.
    """
    search = getattr(sampler, "_search_space", None)
    if memo is None or not isinstance(search, IntersectionSearchSpace):
        return None
    kept = memo.get(_INTERSECTION)
    if kept is not None:
        search._search_space = None if kept[0] is None else dict(kept[0])
        search._cached_trial_number = kept[1]
    return search


def _suggest_one(
    trial: optuna.trial.Trial, name: str, param: FloatParam | IntParam | CategoricalParam
) -> Any:
    dist = distribution(param)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    value = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if dist.step is None:
        return value
    # the lattice point as the decimals read (Optuna's low + k * step carries float noise);
    # rounding to 12 decimals instead wiped out a lattice finer than 1e-12 (1e-15 became 0.0)
    top = round((dist.high - dist.low) / dist.step)
    k = min(max(round((value - dist.low) / dist.step), 0), top)
    return lattice_point(dist.low, dist.step, k)
