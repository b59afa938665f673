"""BOHB's model (Falkner et al., 2018): TPE fitted on the highest rung that has enough
observations, for studies whose ASHA or Hyperband pruner stops or pauses trials at rungs.

A trial pruned or paused at a rung says nothing about the objective at full budget, so plain
TPE learns only from the few trials that finished. BOHB learns from the rungs instead: every
trial that reached rung ``r`` is an observation of (its params, its value at ``r``). The
rung used is the highest one holding at least ``min_points_in_model`` observations (default:
the number of parameters + 1, as in the paper); below that everywhere, the lowest rung (the
one with the most), where TPE samples at random until it has ``n_startup_trials``. The
values compared are the pruner's metric at the rung, in the pruner's direction.

Trials the pruner stopped below the rung are in the model too, on its bad side (ranked as
Optuna ranks pruned trials: by the highest rung they reached, then their value there):
otherwise a model fitted on a high rung that few trials reach would never learn of the many
stopped under it, and would keep proposing them. The good side holds the best 15 % of all
the trials the model sees (as in the paper), at least ``min_points_in_model``, at most those
at the rung. A third of the suggestions are random, as in the paper.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from hpo.service.samplers import _optuna
from hpo.service.samplers._tpe_arrays import ArrayTPESampler
from hpo.service.samplers.base import ObservedTrial, StudyView, Suggestion
from hpo.service.samplers.tpe import TPESampler
from hpo.service.spec import Objective, StudySpec
from hpo.service.states import TrialState

# What a rung holds: {trial number: (its params, its value at the rung)}.
RungValues = Mapping[int, tuple[Mapping[str, Any], float]]
RANDOM_FRACTION = 1 / 3
TOP_FRACTION = 0.15


class BohbSampler(TPESampler):
    """TPE over one rung's values (see the module). ``view.rungs`` maps each rung step to
    what reached it; the ask loads it for samplers with ``uses_rungs``."""

    name = "bohb"
    uses_rungs = True

    @classmethod
    def check(cls, spec: StudySpec) -> None:
        if spec.pruner.type not in ("asha", "hyperband"):
            raise ValueError(
                "sampler.type: bohb learns from the rungs of an `asha` or `hyperband` pruner; "
                f"pruner.type is {spec.pruner.type!r}"
            )
        if spec.multi_objective:
            raise ValueError("sampler.type: bohb models one objective")

    def prepare(self, trial: ObservedTrial) -> Any:
        return None  # the rungs change as trials go on: nothing is kept between asks

    def suggest(self, view: StudyView) -> Suggestion:
        rungs = dict(view.rungs or {})
        need = self.spec.sampler.min_points_in_model or len(self.spec.space) + 1
        full = [step for step, seen in rungs.items() if len(seen) >= need]
        step = max(full) if full else (min(rungs) if rungs else None)
        seen = rungs.get(step, {}) if step is not None else {}
        observed = [
            ObservedTrial(number, TrialState.COMPLETE, dict(params), (value,))
            for number, (params, value) in seen.items()
        ]
        stopped = self._stopped_below(view, rungs, step)
        pending = [t for t in view.pending if t.number not in seen]
        trials = sorted([*observed, *stopped, *pending], key=lambda t: t.number)
        n_good = min(
            len(observed), max(need, math.ceil(TOP_FRACTION * (len(observed) + len(stopped))))
        )
        pruner = self.spec.pruner
        model_spec = self.spec.model_copy(
            update={
                "objective": [
                    Objective(metric=self.spec.pruned_metric, direction=self.spec.pruner_direction)
                ],
                "constraints": [],
            }
        )
        seed = self.trial_seed(view.number)
        opts = self.spec.sampler
        random = bool(np.random.default_rng(seed).random() < RANDOM_FRACTION)
        with warnings.catch_warnings():  # gamma is "deprecated" in Optuna 4 (still honoured)
            warnings.simplefilter("ignore")
            engine = ArrayTPESampler(
                seed=seed,
                # a random suggestion: TPE's start-up sampling, whatever the count
                n_startup_trials=len(trials) + 1 if random else opts.n_startup_trials,
                gamma=lambda n: n_good,
                multivariate=opts.multivariate,
                group=opts.multivariate and any(p.when for p in self.spec.space.values()),
                constant_liar=True,
            )
        params, _ = _optuna.suggest(engine, StudyView(model_spec, trials, view.number))
        info = {
            "sampler": self.name,
            "seed": seed,
            "rung_step": step,
            "n_observations": len(observed),
            "n_stopped_below": len(stopped),
            "n_pending": len(pending),
            "startup": len(observed) < opts.n_startup_trials,
            "random": random,
            "rungs": {str(s): len(v) for s, v in sorted(rungs.items())},
            "metric": pruner.metric or self.spec.pruned_metric,
        }
        return Suggestion(params, info)

    @staticmethod
    def _stopped_below(
        view: StudyView, rungs: Mapping[int, RungValues], step: int | None
    ) -> list[ObservedTrial]:
        """The trials the pruner stopped below rung ``step``, as pruned trials at the highest
        rung each reached: TPE counts them among the bad ones, so the model learns where
        trials do not get through (otherwise a rung reached by few trials is never told
        about the many stopped under it)."""
        pruned = {t.number for t in view.trials if t.state == TrialState.PRUNED}
        at = rungs.get(step, {}) if step is not None else {}
        out: dict[int, ObservedTrial] = {}
        for lower in sorted((s for s in rungs if step is not None and s < step), reverse=True):
            for number, (params, value) in rungs[lower].items():
                if number in pruned and number not in at and number not in out:
                    out[number] = ObservedTrial(
                        number, TrialState.PRUNED, dict(params), None, {lower: value}
                    )
        return list(out.values())
