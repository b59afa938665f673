"""Tree-structured Parzen Estimator, with Optuna's TPESampler as the engine."""

from __future__ import annotations

import warnings
from typing import Any

import optuna

from hpo.service.samplers import _optuna
from hpo.service.samplers._tpe_arrays import ArrayTPESampler, TrialArrays
from hpo.service.samplers.base import StudyView, Suggestion


class TPESampler(_optuna.OptunaBacked):
    """TPE over the stored trials; running trials count as pending (constant liar).

    Conditional spaces are modelled by grouping parameters that appear together
    (``multivariate`` + ``group``), which is what TPE needs to learn per branch.
    """

    name = "tpe"

    def _arrays(self, view: StudyView) -> Any:
        """The study's finished trials as arrays for this view (kept in its memo and extended
        by what arrived since), or None without a memo, with several objectives or with
        constraints (the arrays do not model feasibility: Optuna's own walk does)."""
        if view.memo is None or view.arrivals is None or len(self.spec.objectives) != 1:
            return None
        if self.spec.constraints:
            return None
        direction = optuna.study.StudyDirection[self.spec.objectives[0].direction.upper()]
        key = f"tpe.arrays.{direction.name}"
        arrays = view.memo.get(key)
        if arrays is None:  # dict.setdefault is atomic: racing first asks share one
            arrays = view.memo.setdefault(key, TrialArrays(direction))
        arrays.extend(view.arrivals)
        return arrays.upto(len(view.arrivals))

    def suggest(self, view: StudyView) -> Suggestion:
        seed = self.trial_seed(view.number)
        opts = self.spec.sampler
        conditional = any(p.when for p in self.spec.space.values())
        with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            engine = ArrayTPESampler(
                arrays=self._arrays(view),
                seed=seed,
                n_startup_trials=opts.n_startup_trials,
                multivariate=opts.multivariate,
                group=opts.multivariate and conditional,
                constant_liar=True,
            )
        params, observed = _optuna.suggest(engine, view)
        info = {
            "sampler": self.name,
            "seed": seed,
            "n_observations": observed,
            "n_pending": len(view.pending),
            "startup": observed < opts.n_startup_trials,
        }
        return Suggestion(params, info)
