"""The log-density of a TPE Parzen mixture at a batch of candidates, bit for bit Optuna's.

Optuna's ``_MixtureOfProductDistribution.log_pdf`` evaluates every candidate against every
component of the mixture. Its continuous parameters go through ``_truncnorm.logpdf`` on
three-dimensional (candidates × components × parameters) arrays: new arrays for every
operation, an ``np.select`` over broadcast masks and a sum over the short last axis. With
10,000 finished trials the "above" mixture has 10,000 components, and that one call was half
of an ask (docs/benchmarks.md, "Scale: ask").

:func:`log_pdf` computes the same numbers one parameter at a time on (candidates ×
components) arrays, in place, with the same floating-point operations in the same order, so
the result is identical, not merely close (``tests/service/test_tpe_logpdf.py`` compares them
bit for bit), and a suggestion stays Optuna's for the same seed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

try:
    from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator
except ImportError:  # pragma: no cover - TPESampler itself would not import
    _ParzenEstimator = object  # type: ignore[assignment,misc]
try:  # the Optuna whose log_pdf this follows (5.x); with another, its own code runs
    from optuna.samplers._tpe import _truncnorm
    from optuna.samplers._tpe.probability_distributions import (
        _BatchedCategoricalDistributions,
        _BatchedDiscreteTruncLogNormDistributions,
        _BatchedDiscreteTruncNormDistributions,
        _BatchedTruncLogNormDistributions,
        _BatchedTruncNormDistributions,
        _log_gauss_mass_unique,
        _unique_inverse_2d,
    )

    _IMPORTED = True
except ImportError:  # pragma: no cover - an Optuna without these
    _IMPORTED = False

# numpy sums fewer than 8 numbers in order, one after another (its pairwise summation starts
# at 8): the continuous parameters' terms are added so only while there are fewer than that.
_SEQUENTIAL_SUM = 8


class _Verdicts:
    """Whether the fast path gives Optuna's numbers, learned by comparing the first use of
    each kind of parameter (categorical, stepped, continuous, each linear or log) with
    Optuna's own result. One difference, or one error, turns the fast path off for good."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.same: set[str] = set()  # the kinds seen to agree
        self.off = not _IMPORTED

    def turn_off(self, why: str) -> None:
        with self.lock:
            if not self.off:
                log.warning("TPE: %s; Optuna's own density is used from now on", why)
            self.off = True


_verdicts = _Verdicts()


def log_pdf(mixture: Any, x: np.ndarray) -> np.ndarray:
    """``mixture.log_pdf(x)``: ``x`` is (candidates × parameters) in the mixture's order.

    Until each kind of parameter in the mixture has been seen to agree, Optuna's own result is
    taken too and compared: where the installed Optuna computes its density otherwise than
    the one this follows, its own code is used from then on."""
    if _verdicts.off:
        return mixture.log_pdf(x)
    try:
        ours = _log_pdf(mixture, x)
    except Exception as exc:  # a field or a layout this does not know: Optuna's own code
        _verdicts.turn_off(f"the fast density failed ({type(exc).__name__}: {exc})")
        return mixture.log_pdf(x)
    if ours is None:
        return mixture.log_pdf(x)
    kinds = {type(d).__name__ for d in mixture.distributions}
    if kinds <= _verdicts.same:
        return ours
    theirs = mixture.log_pdf(x)
    if not np.array_equal(ours, theirs, equal_nan=True):
        _verdicts.turn_off(f"this Optuna's density differs from the fast path's ({kinds})")
        return theirs
    with _verdicts.lock:
        if not _verdicts.off:
            _verdicts.same |= kinds
    return ours


class FastParzenEstimator(_ParzenEstimator):  # type: ignore[misc,valid-type]
    """Optuna's Parzen estimator whose density is :func:`log_pdf`: what
    ``TPESampler._compute_acquisition_func`` calls, so the acquisition stays Optuna's."""

    def log_pdf(self, samples_dict: dict[str, np.ndarray]) -> np.ndarray:
        mixture = getattr(self, "_mixture_distribution", None)
        if mixture is None:  # an Optuna that keeps it otherwise
            return super().log_pdf(samples_dict)
        return log_pdf(mixture, self._transform(samples_dict))


def _log_pdf(mixture: Any, x: np.ndarray) -> np.ndarray | None:
    """The density, or None for a mixture this does not follow Optuna on."""
    continuous_types = (_BatchedTruncNormDistributions, _BatchedTruncLogNormDistributions)
    discrete_types = (
        _BatchedDiscreteTruncNormDistributions,
        _BatchedDiscreteTruncLogNormDistributions,
    )
    dists = mixture.distributions
    continuous = [i for i, d in enumerate(dists) if isinstance(d, continuous_types)]
    known = all(
        isinstance(d, (*continuous_types, *discrete_types, _BatchedCategoricalDistributions))
        for d in dists
    )
    if not known or len(continuous) >= _SEQUENTIAL_SUM:
        return None
    weighted = np.zeros((len(x), len(mixture.weights)), dtype=np.float64)
    for i, d in enumerate(dists):
        if isinstance(d, _BatchedCategoricalDistributions):
            # log(take(weights, x)) is take(log(weights), x), element for element.
            weighted += np.log(d.weights.T[x[:, i].astype(np.int64)])
        elif isinstance(d, discrete_types):
            _add_discrete(weighted, d, x[:, i])
    if continuous:
        cont = [dists[i] for i in continuous]
        # The transcendental parts are taken on the same (components × parameters) arrays as
        # Optuna's: numpy's vectorised log/erf may round an element differently depending on
        # where it falls in the array, so the same numbers need the same arrays.
        mus = np.asarray([d.mu for d in cont]).T
        sigmas = np.asarray([d.sigma for d in cont]).T
        a = (np.asarray([d.adapted_low for d in cont]) - mus) / sigmas
        b = (np.asarray([d.adapted_high for d in cont]) - mus) / sigmas
        mass = _truncnorm._log_gauss_mass(a, b)
        log_sigma = np.log(sigmas)
        total = None
        for j, i in enumerate(continuous):
            xi = np.log(x[:, i]) if dists[i].is_log else x[:, i]
            term = _continuous(
                xi, mus[:, j], sigmas[:, j], a[:, j], b[:, j], mass[:, j], log_sigma[:, j]
            )
            if total is None:
                total = term
            else:
                total += term
        weighted += total
    weighted += np.log(mixture.weights[np.newaxis])
    max_ = weighted.max(axis=1)
    max_[np.isneginf(max_)] = 0  # as Optuna: no (-inf) - (-inf) where the density is zero
    weighted -= max_[:, None]
    np.exp(weighted, out=weighted)
    with np.errstate(divide="ignore"):
        return np.log(weighted.sum(axis=1)) + max_


def _continuous(
    xi: np.ndarray,
    mu: np.ndarray,
    sigma: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    mass: np.ndarray,
    log_sigma: np.ndarray,
) -> np.ndarray:
    """One continuous parameter's (candidates × components) term of ``_truncnorm.logpdf``:
    ``xi`` the candidates, the rest per component (``a``, ``b``: the standardised bounds)."""
    z = xi[:, np.newaxis] - mu  # standardised: (x - loc) / scale
    z /= sigma
    out = z**2  # _norm_logpdf: -(z ** 2) / 2 - log C
    np.negative(out, out=out)
    out /= 2.0
    out -= _truncnorm._norm_pdf_logC
    out -= mass
    out -= log_sigma
    # np.select([a == b, (z < a) | (z > b)], [nan, -inf], default=out): the first match wins.
    outside = z < a
    outside |= z > b
    out[outside] = -np.inf
    empty = a == b
    if empty.any():
        out[:, empty] = np.nan
    return out


def _add_discrete(weighted: np.ndarray, d: Any, xi: np.ndarray) -> None:
    """Add one stepped parameter's term to ``weighted``, exactly as Optuna does."""
    step, is_log = d.step, d.is_log
    xi_uniq, xi_inv = np.unique(xi, return_inverse=True)
    mu_uniq, sigma_uniq, mu_sigma_inv = _unique_inverse_2d(d.mu, d.sigma)
    left = np.log(xi_uniq - step / 2) if is_log else (xi_uniq - step / 2)
    right = np.log(xi_uniq + step / 2) if is_log else (xi_uniq + step / 2)
    inside = _log_gauss_mass_unique(
        (left[:, np.newaxis] - mu_uniq) / sigma_uniq,
        (right[:, np.newaxis] - mu_uniq) / sigma_uniq,
    )
    weighted += np.take(inside[xi_inv], mu_sigma_inv, axis=1)  # inside[np.ix_(...)]
    weighted -= _truncnorm._log_gauss_mass(
        (d.adapted_low - mu_uniq) / sigma_uniq, (d.adapted_high - mu_uniq) / sigma_uniq
    )[mu_sigma_inv]
