"""Gaussian-process Bayesian optimisation, with Optuna's GPSampler as the engine."""

from __future__ import annotations

import math
from typing import Any

import optuna

from hpo.service.samplers import _optuna
from hpo.service.samplers.base import ObservedTrial, Sampler, StudyView, Suggestion


class GPSampler(Sampler):
    """GP with expected improvement over the stored trials.

    The GP itself knows nothing of pending trials, so parallel asks would all land on the same
    maximiser of the acquisition function. Pending trials are therefore added as observations
    with the mean of the completed values ("constant liar", CL-mean) once the model is in use.
    """

    name = "gp"

    def prepare(self, trial: ObservedTrial) -> Any:
        """The trial as an Optuna FrozenTrial, made once per finished trial."""
        return _optuna.frozen_trial(self.spec, trial)

    def suggest(self, view: StudyView) -> Suggestion:
        seed = self.trial_seed(view.number)
        n_startup = self.spec.sampler.n_startup_trials
        engine = optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=n_startup, warn_independent_sampling=False
        )
        complete = view.complete
        lie = None
        if len(complete) >= n_startup and complete and view.pending:
            columns = zip(*(t.values for t in complete), strict=True)
            # The mean of the parts, not of the sum: values near ±1.8e308 overflow a sum.
            lie = tuple(math.fsum(v / len(complete) for v in col) for col in columns)
        params, observed = _optuna.suggest(engine, view, lie=lie)
        info = {
            "sampler": self.name,
            "seed": seed,
            "n_observations": observed - (len(view.pending) if lie else 0),
            "n_pending": len(view.pending),
            "startup": len(complete) < n_startup,
        }
        return Suggestion(params, info)
