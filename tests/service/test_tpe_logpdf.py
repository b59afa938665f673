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

from hpo.service.samplers import _tpe_logpdf
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
@pytest.mark.parametrize(
    ("magic_clip", "endpoints", "prior_weight"), [(True, False, 1.0), (False, True, 0.1)]
)
def test_log_pdf_is_optunas_bit_for_bit(
    space_name: str, n: int, magic_clip: bool, endpoints: bool, prior_weight: float
) -> None:
    space = SPACES[space_name]
    rng = np.random.RandomState(n + len(space_name))
    params = _ParzenEstimatorParameters(
        prior_weight=prior_weight,
        consider_magic_clip=magic_clip,
        consider_endpoints=endpoints,
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
        got = _tpe_logpdf._log_pdf(mixture, x)  # the fast path itself, never Optuna's
        if space_name == "eight floats":
            assert got is None  # Optuna's own code runs
            continue
        assert got is not None and got.shape == expected.shape
        assert np.array_equal(got, expected, equal_nan=True), np.nanmax(np.abs(got - expected))


def test_an_optuna_that_computes_its_density_otherwise_keeps_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each kind of parameter's first use is compared with Optuna's own result; where they
    differ (another Optuna version), Optuna's is answered then and from then on. A mixture of
    one kind agreeing first does not vouch for another kind."""
    rng = np.random.RandomState(0)
    params = _ParzenEstimatorParameters(1.0, True, False, default_weights, True)

    def mixture_of(space: dict) -> object:
        return _ParzenEstimator(_observations(space, 50, rng), space, params)._mixture_distribution

    categorical = mixture_of({"opt": SPACES["mixed"]["opt"]})
    floats = mixture_of({"x": SPACES["mixed"]["x"]})

    class Otherwise:  # the float mixture, whose own density is computed "otherwise"
        weights, distributions = floats.weights, floats.distributions

        def log_pdf(self, x: np.ndarray) -> np.ndarray:
            return floats.log_pdf(x) + 1.0

    verdicts = _tpe_logpdf._Verdicts()
    monkeypatch.setattr(_tpe_logpdf, "_verdicts", verdicts)
    assert np.array_equal(
        log_pdf(categorical, np.array([[1.0]])), categorical.log_pdf(np.array([[1.0]]))
    )
    assert verdicts.same == {"_BatchedCategoricalDistributions"} and not verdicts.off
    x = np.array([[0.5], [-2.0]])
    assert np.array_equal(log_pdf(Otherwise(), x), floats.log_pdf(x) + 1.0)
    assert verdicts.off
    assert np.array_equal(log_pdf(floats, x), floats.log_pdf(x))  # Optuna's own from now on

    verdicts = _tpe_logpdf._Verdicts()
    monkeypatch.setattr(_tpe_logpdf, "_verdicts", verdicts)
    assert np.array_equal(log_pdf(floats, x), floats.log_pdf(x))
    assert verdicts.same == {"_BatchedTruncNormDistributions"}

    def broken(mixture: object, x: np.ndarray) -> np.ndarray:
        raise AttributeError("a field this version lacks")

    monkeypatch.setattr(_tpe_logpdf, "_log_pdf", broken)  # an error: Optuna's code, for good
    assert np.array_equal(log_pdf(floats, x), floats.log_pdf(x)) and verdicts.off


def test_the_array_tpe_engine_builds_the_fast_estimators() -> None:
    from hpo.service.samplers._tpe_arrays import ArrayTPESampler

    engine = ArrayTPESampler(seed=0, constant_liar=True)
    assert engine._parzen_estimator_cls is _tpe_logpdf.FastParzenEstimator
