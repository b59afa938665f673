"""Optuna's TPE step fed from per-study arrays instead of a walk over every trial per ask.

Optuna's ``TPESampler._sample`` splits the trials into "below" and "above" and reads each
trial's parameters into arrays (``_split_trials``, ``_get_internal_repr``): Python loops over
every trial, on every ask, that made up most of an ask at 10,000 trials. Here the finished
trials' internal representations, values and pruned scores are kept as numpy arrays in the
study's memo (:attr:`StudyView.memo`), extended by the trials that arrived since the last ask
(:attr:`StudyView.arrivals`), and the split is done with stable numpy sorts on them. Only the
pending trials (a handful) are read one by one. The Parzen estimators, the sampling and the
acquisition are Optuna's own code on the same inputs, so a suggestion equals Optuna's for the
same seed (tests/service/test_studies.py compares them with a full read on every ask).

Where the arrays cannot stand in for Optuna's walk (several objectives, constraints, a value
that is NaN, a parameter whose distribution differs from the search space's), the engine
falls back to Optuna's own ``_sample``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator
from optuna.samplers._tpe.sampler import default_gamma
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo.service.samplers._optuna import ViewStorage
from hpo.service.samplers._tpe_logpdf import FastParzenEstimator


class TrialArrays:
    """A study's finished trials, as TPE reads them, in arrival order (rows only appended).

    One instance lives in a study's memo under :func:`key` and is shared by concurrent asks:
    :meth:`extend` appends under a lock and :meth:`upto` reads a prefix, which later appends
    never change.
    """

    def __init__(self, direction: StudyDirection) -> None:
        self.direction = direction
        self.lock = threading.Lock()
        self.rows = 0  # arrivals consumed (one row each, valid or not)
        self.usable = True  # False once a trial that the arrays cannot represent arrived
        self.valid = np.zeros(0, dtype=bool)  # rows Optuna sees (prepare gave a trial)
        self.number = np.zeros(0, dtype=np.int64)
        self.complete = np.zeros(0, dtype=bool)  # else pruned
        self.value = np.zeros(0)
        self.pruned_key = np.zeros((0, 2))  # Optuna's _get_pruned_trial_score
        self.dists: dict[str, BaseDistribution] = {}
        self.columns: dict[str, np.ndarray] = {}  # internal repr per parameter
        self.has: dict[str, np.ndarray] = {}  # whether the trial has the parameter

    def extend(self, arrivals: Sequence[Any]) -> None:
        """Append the rows of ``arrivals[self.rows:]`` (FrozenTrials or None)."""
        with self.lock:
            new = arrivals[self.rows :]
            if not new:
                return
            k = len(new)
            valid = np.zeros(k, dtype=bool)
            number = np.zeros(k, dtype=np.int64)
            complete = np.zeros(k, dtype=bool)
            value = np.zeros(k)
            pruned_key = np.zeros((k, 2))
            cols: dict[str, list[Any]] = {n: [0] * k for n in self.columns}
            has: dict[str, np.ndarray] = {n: np.zeros(k, dtype=bool) for n in self.columns}
            for i, trial in enumerate(new):
                if trial is None:
                    continue
                valid[i] = True
                number[i] = trial.number
                if not self._representable(trial):
                    self.usable = False
                    continue
                if trial.state == TrialState.COMPLETE:
                    complete[i] = True
                    value[i] = trial.value
                else:
                    pruned_key[i] = _pruned_score(trial, self.direction)
                for name, param in trial.params.items():
                    dist = trial.distributions[name]
                    if name not in self.columns:
                        self.dists[name] = dist
                        self.columns[name] = _empty(dist, self.rows)
                        self.has[name] = np.zeros(self.rows, dtype=bool)
                        cols[name] = [0] * k
                        has[name] = np.zeros(k, dtype=bool)
                    elif dist != self.dists[name]:
                        self.usable = False
                        continue
                    cols[name][i] = dist.to_internal_repr(param)
                    has[name][i] = True
            self.valid = np.concatenate([self.valid, valid])
            self.number = np.concatenate([self.number, number])
            self.complete = np.concatenate([self.complete, complete])
            self.value = np.concatenate([self.value, value])
            self.pruned_key = np.concatenate([self.pruned_key, pruned_key])
            for name in self.columns:
                dtype = self.columns[name].dtype
                self.columns[name] = np.concatenate(
                    [self.columns[name], np.asarray(cols[name], dtype=dtype)]
                )
                self.has[name] = np.concatenate([self.has[name], has[name]])
            self.rows += k

    @staticmethod
    def _representable(trial: FrozenTrial) -> bool:
        if trial.system_attrs:  # constraints live there; ours never set any
            return False
        if trial.state == TrialState.COMPLETE:
            return (
                trial.values is not None and len(trial.values) == 1 and not math.isnan(trial.value)
            )
        return trial.state == TrialState.PRUNED

    def upto(self, rows: int) -> _Snapshot | None:
        """The finished trials of a view whose arrivals are ``rows`` long, in number order;
        None when the arrays cannot stand in for them."""
        with self.lock:
            if not self.usable or rows > self.rows:
                return None
            valid = self.valid[:rows]
            columns = {n: c[:rows] for n, c in self.columns.items()}
            has = {n: h[:rows] for n, h in self.has.items()}
            number, complete = self.number[:rows], self.complete[:rows]
            value, pruned_key = self.value[:rows], self.pruned_key[:rows]
            dists = dict(self.dists)
        keep = np.flatnonzero(valid)
        order = keep[np.argsort(number[keep], kind="stable")]
        return _Snapshot(
            direction=self.direction,
            number=number[order],
            complete=complete[order],
            value=value[order],
            pruned_key=pruned_key[order],
            dists=dists,
            columns={n: c[order] for n, c in columns.items()},
            has={n: h[order] for n, h in has.items()},
        )


def _empty(dist: BaseDistribution, n: int) -> np.ndarray:
    # Optuna builds these with np.asarray over to_internal_repr results: ints for a
    # categorical's index, floats otherwise.
    return np.zeros(n, dtype=np.int64 if isinstance(dist, CategoricalDistribution) else float)


def _pruned_score(trial: FrozenTrial, direction: StudyDirection) -> tuple[float, float]:
    """optuna.samplers._tpe.sampler._get_pruned_trial_score, for one objective."""
    if trial.intermediate_values:
        step, value = max(trial.intermediate_values.items())
        if math.isnan(value):
            return -step, math.inf
        return -step, value if direction == StudyDirection.MINIMIZE else -value
    return 1, 0.0


class _Snapshot:
    """The finished trials one ask sees, in number order (what ``_split_trials`` walks)."""

    def __init__(
        self,
        *,
        direction: StudyDirection,
        number: np.ndarray,
        complete: np.ndarray,
        value: np.ndarray,
        pruned_key: np.ndarray,
        dists: dict[str, BaseDistribution],
        columns: dict[str, np.ndarray],
        has: dict[str, np.ndarray],
    ) -> None:
        self.direction = direction
        self.number = number
        self.complete = complete
        self.value = value
        self.pruned_key = pruned_key
        self.dists = dists
        self.columns = columns
        self.has = has

    def __len__(self) -> int:
        return len(self.number)

    def below(self, n_below: int) -> np.ndarray:
        """A mask of the rows in Optuna's "below" group (_split_trials without constraints)."""
        mask = np.zeros(len(self), dtype=bool)
        done = np.flatnonzero(self.complete)
        # Python's sorted is stable, reverse=True included: a stable argsort of the negation.
        key = self.value[done] if self.direction == StudyDirection.MINIMIZE else -self.value[done]
        n_complete = min(n_below, len(done))
        mask[done[np.argsort(key, kind="stable")[:n_complete]]] = True
        n_below = max(0, n_below - n_complete)
        pruned = np.flatnonzero(~self.complete)
        keys = self.pruned_key[pruned]
        n_pruned = min(n_below, len(pruned))
        mask[pruned[np.lexsort((keys[:, 1], keys[:, 0]))[:n_pruned]]] = True
        return mask

    def observations(
        self,
        search_space: dict[str, BaseDistribution],
        rows: np.ndarray,
        extra: list[tuple[int, list[Any]]],
    ) -> dict[str, np.ndarray] | None:
        """Optuna's _get_internal_repr of the ``rows`` having every parameter of the space,
        merged in number order with ``extra`` (number, internal values in space order); None
        if a parameter's distribution is not the search space's."""
        take = rows.copy()
        for name, dist in search_space.items():
            if name not in self.columns:
                take[:] = False
                continue
            if self.dists[name] != dist:
                return None
            take &= self.has[name]
        obs = {
            name: self.columns[name][take] if name in self.columns else None
            for name in search_space
        }
        if extra:
            numbers = np.concatenate([self.number[take], [n for n, _ in extra]])
            order = np.argsort(numbers, kind="stable")
            for j, name in enumerate(search_space):
                own = [v[j] for _, v in extra]
                base = obs[name]
                merged = own if base is None else [*base.tolist(), *own]
                obs[name] = np.asarray(merged)[order]
        out: dict[str, np.ndarray] = {}
        for name in search_space:
            col = obs[name]
            # np.asarray([]) is float64 whatever the parameter: as Optuna's empty lists.
            out[name] = np.asarray([]) if col is None or len(col) == 0 else col
        return out


class ArrayTPESampler(optuna.samplers.TPESampler):
    """Optuna's TPESampler whose ``_sample`` reads a :class:`TrialArrays` snapshot.

    It serves one ask over a :class:`ViewStorage` that :func:`_optuna.suggest` filled
    (``running``, ``finished``); the snapshot must cover exactly the view's finished trials,
    which is checked (by count) before it is used.
    """

    def __init__(self, *args: Any, arrays: _Snapshot | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._arrays = arrays
        if self._parzen_estimator_cls is _ParzenEstimator:  # the same numbers, sooner
            self._parzen_estimator_cls = FastParzenEstimator

    def _sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        # Optuna's, with the count of finished trials that suggest() made (Optuna filters
        # every trial by state to count them).
        finished = getattr(study._storage, "finished", None)
        if search_space == {} or finished is None:
            return super()._sample_relative(study, trial, search_space)
        if finished < self._n_startup_trials:
            return {}
        return self._sample(study, trial, search_space)

    def _sample(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        made = self._sample_from_arrays(study, trial, search_space)
        return super()._sample(study, trial, search_space) if made is None else made

    def _sample_from_arrays(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any] | None:
        arrays, storage = self._arrays, study._storage
        if (
            arrays is None
            or not self._constant_liar
            or self._constraints_func is not None
            or len(study.directions) != 1
            or not isinstance(storage, ViewStorage)
            or storage.running is None
            or storage.finished != len(arrays)
        ):
            return None
        # Pending trials go "above" before any feasibility check (Optuna's _split_trials).
        running = [t for t in storage.running if t.number != trial.number]
        if self._gamma is None:  # as Optuna's _sample, for one objective
            self._gamma = default_gamma
        below = arrays.below(self._gamma(len(arrays)))
        extra = []
        for t in running:  # pending trials are "above" (Optuna's _split_trials)
            params = self._get_params(t, study)
            if search_space.keys() <= params.keys():
                extra.append(
                    (t.number, [d.to_internal_repr(params[n]) for n, d in search_space.items()])
                )
        obs_below = arrays.observations(search_space, below, [])
        obs_above = arrays.observations(search_space, ~below, extra)
        if obs_below is None or obs_above is None:
            return None
        # From here on, Optuna's _sample and _build_parzen_estimator (one objective).
        mpe_below = self._parzen_estimator_cls(
            obs_below, search_space, self._parzen_estimator_parameters
        )
        mpe_above = self._parzen_estimator_cls(
            obs_above, search_space, self._parzen_estimator_parameters
        )
        samples_below = mpe_below.sample(self._rng.rng, self._n_ei_candidates)
        acq_func_vals = self._compute_acquisition_func(samples_below, mpe_below, mpe_above)
        ret = optuna.samplers.TPESampler._compare(samples_below, acq_func_vals)
        for param_name, dist in search_space.items():
            ret[param_name] = dist.to_external_repr(ret[param_name])
        return ret
