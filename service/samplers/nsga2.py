"""NSGA-II (a genetic algorithm for several objectives), with Optuna's NSGAIISampler as the
engine.

Optuna records each trial's generation in its system attributes; here it is stored with the
trial's suggestion (``info["kept"]``) and handed back with the trial. The parents of a
generation are selected again on each ask from the trials (Optuna caches them in the study
on first use), so they may include trials of the previous generation that completed after
the generation began.
"""

from __future__ import annotations

from typing import Any

import optuna

from hpo.service.samplers import _optuna
from hpo.service.samplers.base import ObservedTrial, Sampler, StudyView, Suggestion

_GENERATION = "NSGAIISampler:generation"


class NSGAIISampler(Sampler):
    """Generations of ``population_size`` trials (50 when unset); the first is random, each
    later one is bred from the elite of the ones before (non-dominated sorting and crowding
    distance; feasible trials first when the spec has constraints). Works for one objective
    too."""

    name = "nsga2"
    keeps_state = True

    def prepare(self, trial: ObservedTrial) -> Any:
        """The trial as an Optuna FrozenTrial, made once per finished trial."""
        return _optuna.frozen_trial(self.spec, trial)

    def suggest(self, view: StudyView) -> Suggestion:
        seed = self.trial_seed(view.number)
        engine = optuna.samplers.NSGAIISampler(
            seed=seed, population_size=self.spec.sampler.population_size or 50
        )
        params, observed, kept = _optuna.suggest_keeping(engine, view)
        info = {
            "sampler": self.name,
            "seed": seed,
            "n_observations": observed,
            "generation": kept.get(_GENERATION),
            "kept": kept,
        }
        return Suggestion(params, info)
