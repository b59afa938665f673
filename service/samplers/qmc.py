"""Quasi-Monte Carlo (Sobol or Halton sequences), with Optuna's QMCSampler as the engine."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution

from hpo.service.samplers import _optuna
from hpo.service.samplers.base import Sampler, StudyView, Suggestion


class _NumberedQMC(optuna.samplers.QMCSampler):
    """Optuna's QMC point for a given index over a given space: our trial number picks the
    point (Optuna counts asks in a study attribute, which a view does not keep)."""

    def __init__(self, *, space: dict[str, BaseDistribution], index: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._space = space
        self._index = index

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, BaseDistribution]:
        return dict(self._space) if self._index >= 0 else {}

    def _find_sample_id(self, study: Any, search_space: dict[str, BaseDistribution]) -> int:
        return self._index


class QMCSampler(Sampler):
    """Trial ``n`` takes point ``n - 1`` of the sequence over the parameters that are always
    active, as Optuna's QMCSampler gives its trial ``n`` in a study of its own; trial 0 and
    conditional parameters are drawn at random (seeded per trial). Needs no history, so an
    ask costs the same at any study size. ``scramble: true`` scrambles with the study seed."""

    name = "qmc"
    uses_history = False

    def suggest(self, view: StudyView) -> Suggestion:
        opts = self.spec.sampler
        seed = self.trial_seed(view.number)
        space = {
            name: _optuna.distribution(param)
            for name, param in self.spec.space.items()
            if not param.when and not _optuna.distribution(param).single()
        }
        engine = _NumberedQMC(
            space=space,
            index=view.number - 1,
            qmc_type=opts.qmc_type,
            scramble=opts.scramble,
            seed=opts.seed,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
            warn_asynchronous_seeding=False,
            warn_independent_sampling=False,
        )
        params, _ = _optuna.suggest(engine, view)
        info = {
            "sampler": self.name,
            "seed": seed,
            "qmc_type": opts.qmc_type,
            "index": view.number - 1 if view.number > 0 and space else None,
            "n_observations": 0,
        }
        return Suggestion(params, info)
