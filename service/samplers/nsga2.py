"""NSGA-II (a genetic algorithm for several objectives), with Optuna's NSGAIISampler as the
engine.

Optuna records each trial's generation in its system attributes; here it is stored with the
trial's suggestion (``info["kept"]``) and handed back with the trial. The parents of a
generation are selected again on each ask from the trials (Optuna caches them in the study
on first use), so they may include trials of the previous generation that completed after
the generation began (where Optuna's cache would not).
"""

from __future__ import annotations

from typing import Any

import optuna

from hpo.service.samplers import _optuna
from hpo.service.samplers.base import StudyView, Suggestion

_GENERATION = "NSGAIISampler:generation"


class _ViewNSGAII(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, giving a generation's parents in the order Optuna's study cache
    would: the order of selection on the first ask that needs them, trial order on later
    asks (the cache lists them by trial). The parents themselves are selected again."""

    def __init__(self, *, number: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._number = number

    def _sync_generation_cache(self, study: Any) -> list[Any]:
        """The latest complete generation and its trial numbers, found without Optuna's
        ``trials[number]``: a view holds no failed trial, so a list position is not a trial
        number (one failed trial made every later ask an IndexError)."""
        trials = study._get_trials(deepcopy=False, use_cache=True)
        numbers: dict[int, list[int]] = {}  # generation: its complete trials' numbers
        for trial in trials:
            generation = trial.system_attrs.get(self._get_generation_key())
            if trial.state == optuna.trial.TrialState.COMPLETE and generation is not None:
                numbers.setdefault(generation, []).append(trial.number)
        self._cached_generation = max(numbers, default=0)
        self._cached_generation_numbers = numbers.get(self._cached_generation, [])
        return trials

    def get_population(self, study: Any, generation: int) -> list[Any]:
        key = self._get_generation_key()
        return [
            t
            for t in self._sync_generation_cache(study)
            if t.state == optuna.trial.TrialState.COMPLETE and t.system_attrs.get(key) == generation
        ]

    def get_parent_population(self, study: Any, generation: int) -> list[Any]:
        parents = super().get_parent_population(study, generation)
        earlier = (
            t.system_attrs.get(_GENERATION, -1)
            for t in study._get_trials(deepcopy=False)
            if t.number != self._number
        )
        if any(g >= generation for g in earlier):  # an earlier ask cached them
            parents = sorted(parents, key=lambda t: t.number)
        return parents


# Optuna names the generation attribute after the class; keep the name Optuna's own sampler
# writes (a subclass would write "_ViewNSGAII:generation").
_ViewNSGAII._GENERATION_KEY = _GENERATION


class NSGAIISampler(_optuna.OptunaBacked):
    """Generations of ``population_size`` trials (50 when unset); the first is random, each
    later one is bred from the elite of the ones before (non-dominated sorting and crowding
    distance; feasible trials first when the spec has constraints). Works for one objective
    too."""

    name = "nsga2"
    keeps_state = True

    def suggest(self, view: StudyView) -> Suggestion:
        seed = self.trial_seed(view.number)
        engine = _ViewNSGAII(
            number=view.number, seed=seed, population_size=self.spec.sampler.population_size or 50
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
