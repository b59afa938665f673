"""The TPE mixture density of ``service/samplers/_tpe_logpdf.py`` is Optuna's, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator, _ParzenEstimatorParameters
from optuna.samplers._tpe.sampler import default_weights

from hpo.service.samplers._tpe_logpdf import log_pdf

SPACES: dict[str, dict[str, BaseDistribution]] = {
    "mixed": {
        "x": FloatDistribution(-5.0, 5.0),
        "lr": FloatDistribution(1e-5, 1.0, log=True),
        "n": IntDistribution(1, 8),
        "opt": CategoricalDistribution(["sgd", "adam", "rmsprop"]),
    },
    "one float": {"x": FloatDistribution(0.0, 1.0)},
    "stepped": {
        "q": FloatDistribution(0.0, 1.0, step=0.1),
        "units": IntDistribution(16, 1024, log=True),
        "depth": IntDistribution(1, 3),
    },
    "categorical only": {"a": CategoricalDistribution([1, 2]), "b": CategoricalDistribution("xyz")},
    # eight continuous parameters: past numpy's in-order sum, so Optuna's own code runs
    "eight floats": {f"f{i}": FloatDistribution(-1.0, 1.0 + i) for i in range(8)},
    "seven floats": {f"f{i}": FloatDistribution(-1.0, 1.0 + i, log=False) for i in range(7)},
}


def _observations(space: dict[str, BaseDistribution], n: int, rng: np.random.RandomState) -> dict:
    columns = {}
    for name, d in space.items():
        if isinstance(d, CategoricalDistribution):
            columns[name] = rng.randint(0, len(d.choices), n).astype(float)
        elif isinstance(d, IntDistribution):
            columns[name] = rng.randint(d.low, d.high + 1, n).astype(float)
        elif d.log:
            columns[name] = np.exp(rng.uniform(np.log(d.low), np.log(d.high), n))
        elif d.step is not None:
            k = round((d.high - d.low) / d.step)
            columns[name] = d.low + rng.randint(0, k + 1, n) * d.step
        else:  # the bounds themselves, and many repeats, among them
            values = rng.uniform(d.low, d.high, n)
            values[: n // 10] = d.low
            values[n // 10 : n // 5] = d.high
            columns[name] = values
    return columns


@pytest.mark.parametrize("space_name", list(SPACES))
@pytest.mark.parametrize("n", [0, 1, 3, 30, 2_000])
@pytest.mark.parametrize("magic_clip", [True, False])
def test_log_pdf_is_optunas_bit_for_bit(space_name: str, n: int, magic_clip: bool) -> None:
    space = SPACES[space_name]
    rng = np.random.RandomState(n + len(space_name))
    params = _ParzenEstimatorParameters(
        prior_weight=1.0,
        consider_magic_clip=magic_clip,
        consider_endpoints=False,
        weights=default_weights,
        multivariate=True,
    )
    above = _ParzenEstimator(_observations(space, n, rng), space, params)
    below = _ParzenEstimator(_observations(space, max(1, n // 10), rng), space, params)
    samples = below.sample(rng, 24)
    x = below._transform(samples)
    # and candidates on the bounds of every parameter
    edges = below._transform(above.sample(rng, 8))
    x = np.concatenate([x, edges])
    for i, d in enumerate(space.values()):
        if not isinstance(d, CategoricalDistribution):
            x[-2, i], x[-1, i] = d.low, d.high
    for mixture in (above._mixture_distribution, below._mixture_distribution):
        expected = mixture.log_pdf(x)
        got = log_pdf(mixture, x)
        assert got.shape == expected.shape
        assert np.array_equal(got, expected, equal_nan=True), np.nanmax(np.abs(got - expected))
