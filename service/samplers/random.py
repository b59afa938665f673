"""Random search: each parameter drawn independently from its domain."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hpo.service.samplers.base import Sampler, StudyView, Suggestion
from hpo.service.spec import CategoricalParam, FloatParam, IntParam, lattice_point


class RandomSampler(Sampler):
    """Uniform (or log-uniform) draws; reproducible per trial number when seeded."""

    name = "random"
    uses_history = False

    def suggest(self, view: StudyView) -> Suggestion:
        seed = self.trial_seed(view.number)
        rng = np.random.default_rng(seed)
        params: dict[str, Any] = {}
        for pname in self.spec.parameter_order():
            if self.spec.is_active(pname, params):
                params[pname] = sample_param(self.spec.space[pname], rng)
        info = {"sampler": self.name, "seed": seed, "n_observations": 0}
        return Suggestion(params, info)


def sample_param(param: FloatParam | IntParam | CategoricalParam, rng: np.random.Generator) -> Any:
    """One random value from a parameter's domain."""
    if isinstance(param, CategoricalParam):
        return param.choices[int(rng.integers(len(param.choices)))]
    if param.values is not None:
        return param.values[int(rng.integers(len(param.values)))]
    if isinstance(param, IntParam):
        if param.log:
            lo, hi = math.log(param.low - 0.5), math.log(param.high + 0.5)
            value = round(math.exp(rng.uniform(lo, hi)))
            return int(min(max(value, param.low), param.high))
        n = (param.high - param.low) // param.step
        return int(param.low + param.step * int(rng.integers(n + 1)))
    if param.log:  # exp(log(x)) of a bound may be a few ulps past it: kept inside
        value = math.exp(rng.uniform(math.log(param.low), math.log(param.high)))
        return float(min(max(value, param.low), param.high))
    if param.step is not None:  # as the decimals read (a 1e-20 step is not rounded away)
        n = math.floor((param.high - param.low) / param.step + 1e-9)
        return lattice_point(param.low, param.step, int(rng.integers(n + 1)))
    return float(rng.uniform(param.low, param.high))
