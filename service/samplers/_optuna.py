"""Drive an Optuna sampler from our stored trials (Optuna is the engine, we keep the state).

Each suggestion builds a throw-away in-memory Optuna study holding the observed trials, asks it
once, and reads the parameters back. Pending (running or waiting) trials go in as RUNNING so
samplers that know about them (TPE's constant liar) spread parallel asks apart.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from hpo.service.samplers.base import ObservedTrial, StudyView
from hpo.service.spec import CategoricalParam, FloatParam, IntParam, StudySpec

optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

_STATES = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED}


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
    if step is not None:  # Optuna wants high on the lattice
        n = int((param.high - param.low) / step + 1e-9)
        high = param.low + n * step
    return FloatDistribution(float(param.low), float(high), log=param.log, step=step)


def frozen_trial(
    spec: StudySpec, trial: ObservedTrial, lie: tuple[float, ...] | None = None
) -> optuna.trial.FrozenTrial | None:
    """Our trial as an Optuna FrozenTrial, or None if Optuna should not see it."""
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
    try:
        return optuna.trial.create_trial(
            state=state,
            values=values,
            params=params,
            distributions=dists,
            intermediate_values=dict(trial.intermediate),
        )
    except ValueError:  # a value outside a distribution after a spec edit: leave it out
        return None


def suggest(
    sampler: optuna.samplers.BaseSampler,
    view: StudyView,
    *,
    lie: tuple[float, ...] | None = None,
) -> tuple[dict[str, Any], int]:
    """Ask ``sampler`` for the next parameters given ``view``; returns them and the trials used."""
    spec = view.spec
    study = optuna.create_study(sampler=sampler, directions=[o.direction for o in spec.objectives])
    frozen = [frozen_trial(spec, t, lie) for t in view.trials]
    frozen = [f for f in frozen if f is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.add_trials(frozen)
        trial = study.ask()
        params: dict[str, Any] = {}
        for name in spec.parameter_order():
            if spec.is_active(name, params):
                params[name] = _suggest_one(trial, name, spec.space[name])
    observed = sum(1 for f in frozen if f.state in (TrialState.COMPLETE, TrialState.PRUNED))
    return params, observed


def _suggest_one(
    trial: optuna.trial.Trial, name: str, param: FloatParam | IntParam | CategoricalParam
) -> Any:
    dist = distribution(param)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    value = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return round(value, 12) if dist.step is not None else value
