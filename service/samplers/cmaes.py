"""CMA-ES (covariance matrix adaptation), with Optuna's CmaEsSampler as the engine.

Optuna keeps CMA-ES's state in the trials' system attributes: each asked trial's generation,
and the optimizer (pickled, as hex) on the trial whose ask closed a generation. Here they are
stored with the trial's suggestion (``info["kept"]``) and handed back to the engine with the
trial, so the state survives restarts as it does in Optuna's own storages.
"""

from __future__ import annotations

import optuna

from hpo.service.samplers import _optuna
from hpo.service.samplers.base import StudyView, Suggestion
from hpo.service.spec import CategoricalParam, StudySpec


class CmaEsSampler(_optuna.OptunaBacked):
    """CMA-ES over the numeric parameters after ``n_startup_trials`` random ones; a generation
    has ``population_size`` trials (CMA-ES's default for the dimension when unset).
    Categorical and conditional parameters are drawn at random, as Optuna does. Single
    objective only."""

    name = "cmaes"
    keeps_state = True

    @classmethod
    def check(cls, spec: StudySpec) -> None:
        if spec.multi_objective:
            raise ValueError("sampler.type: cmaes optimises a single objective")
        if all(isinstance(p, CategoricalParam) or p.when for p in spec.space.values()):
            raise ValueError("space: cmaes needs at least one unconditional numeric parameter")

    def suggest(self, view: StudyView) -> Suggestion:
        seed = self.trial_seed(view.number)
        opts = self.spec.sampler
        engine = optuna.samplers.CmaEsSampler(
            seed=seed,
            n_startup_trials=opts.n_startup_trials,
            popsize=opts.population_size,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
            warn_independent_sampling=False,
        )
        params, observed, kept = _optuna.suggest_keeping(engine, view)
        info = {
            "sampler": self.name,
            "seed": seed,
            "n_observations": observed,
            "n_pending": len(view.pending),
            "startup": observed < opts.n_startup_trials,
            "generation": kept.get("cma:generation"),
            "kept": kept,
        }
        return Suggestion(params, info)
