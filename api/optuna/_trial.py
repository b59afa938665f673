"""Trials as Optuna shows them: the running :class:`Trial` an objective gets, and
:class:`FrozenTrial`, a finished (or any) trial read back from the server."""

from __future__ import annotations

import datetime
import enum
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hpo.api.objective import TrialHandle, is_number, is_step
from hpo.service import errors
from hpo.service.records import TrialRecord

from .distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    from_param,
)


class TrialState(enum.IntEnum):
    RUNNING = 0
    COMPLETE = 1
    PRUNED = 2
    FAIL = 3
    WAITING = 4

    def __str__(self) -> str:  # Optuna's: "TrialState.COMPLETE", not the number
        return f"TrialState.{self.name}"

    def is_finished(self) -> bool:
        return self in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


_STATES = {
    "running": TrialState.RUNNING,
    "paused": TrialState.RUNNING,
    "waiting": TrialState.WAITING,
    "complete": TrialState.COMPLETE,
    "pruned": TrialState.PRUNED,
    "failed": TrialState.FAIL,
}


class _Suggests:
    """Optuna's ``suggest_*`` names, each a domain handed to ``_suggest(name, dist)``: the
    server's answer for a running :class:`Trial`, the stored value for a :class:`FrozenTrial`
    or a :class:`FixedTrial`."""

    def _suggest(self, name: str, dist: BaseDistribution) -> Any:
        raise NotImplementedError

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return self._suggest(name, FloatDistribution(low, high, log=log, step=step))

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        return self._suggest(name, IntDistribution(low, high, log=log, step=step))

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._suggest(name, CategoricalDistribution(tuple(choices)))

    def suggest_uniform(self, name: str, low: float, high: float) -> float:
        return self.suggest_float(name, low, high)

    def suggest_loguniform(self, name: str, low: float, high: float) -> float:
        return self.suggest_float(name, low, high, log=True)

    def suggest_discrete_uniform(self, name: str, low: float, high: float, q: float) -> float:
        return self.suggest_float(name, low, high, step=q)


@dataclass
class FrozenTrial(_Suggests):
    """A trial's record, Optuna's way: ``number``, ``state``, ``value(s)``, ``params``,
    ``user_attrs``, ``datetime_start`` / ``datetime_complete``, ``duration``."""

    number: int
    state: TrialState
    values: list[float] | None
    params: dict[str, Any]
    user_attrs: dict[str, Any] = field(default_factory=dict)
    datetime_start: datetime.datetime | None = None
    datetime_complete: datetime.datetime | None = None
    intermediate_values: dict[int, float] = field(default_factory=dict)
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    system_attrs: dict[str, Any] = field(default_factory=dict)
    trial_id: int | None = None
    # the names an objective run on this trial has suggested (each checked against its
    # first kind); ``distributions`` read back from the study's space are not checked: a
    # grid study declares every parameter as its list of values
    _suggested: set[str] = field(default_factory=set, repr=False, compare=False)

    @property
    def value(self) -> float | None:
        if self.values is not None and len(self.values) > 1:
            raise RuntimeError("a multi-objective trial has `values`, not `value`")
        return None if self.values is None else self.values[0]

    @property
    def duration(self) -> datetime.timedelta | None:
        if self.datetime_start is None or self.datetime_complete is None:
            return None
        return self.datetime_complete - self.datetime_start

    @property
    def last_step(self) -> int | None:
        return max(self.intermediate_values) if self.intermediate_values else None

    # An objective run on a finished trial (``objective(study.best_trial)``, as in Optuna):
    # its suggest_* answer the trial's values, reports go nowhere, nothing is pruned.
    def _suggest(self, name: str, dist: BaseDistribution) -> Any:
        if name not in self.params:
            raise ValueError(
                f"The value of the parameter '{name}' is not found. Please set it at the "
                "construction of the trial."
            )
        if name in self._suggested:
            _check_same_kind(self.distributions[name], dist)
        self._suggested.add(name)
        self.distributions[name] = dist
        value = self.params[name]
        if not dist.contains(value):
            warnings.warn(
                f"The value {value!r} of the parameter '{name}' is out of the range of the "
                f"distribution {dist}.",
                stacklevel=3,
            )
        if isinstance(dist, IntDistribution) and isinstance(value, float) and value.is_integer():
            return int(value)  # as Optuna answers an int parameter given as 3.0
        return value

    def report(self, value: float, step: int) -> None:
        """Nothing to do: a finished (or fixed) trial stores no reports."""

    def should_prune(self) -> bool:
        return False

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value

    def set_system_attr(self, key: str, value: Any) -> None:
        self.system_attrs[key] = value

    @classmethod
    def from_record(
        cls,
        record: TrialRecord,
        intermediate_values: Mapping[int, float] | None = None,
        space: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> FrozenTrial:
        """The trial as Optuna shows it, with the objective's reports ``intermediate_values``
        and the distributions of its parameters in the study's ``space``, when given."""
        values = record.values if record.values is not None else None
        if values is None and record.value is not None:
            values = [record.value]
        distributions = {}
        for name in record.params:
            dist = from_param(space[name]) if space and name in space else None
            if dist is not None:
                distributions[name] = dist
        return cls(
            number=record.number,
            state=_STATES[str(record.state)],
            values=values if record.state != "failed" else None,
            params=dict(record.params),
            user_attrs=dict(record.user_attrs),
            datetime_start=_local(record.started_at),
            datetime_complete=_local(record.finished_at),
            intermediate_values=dict(intermediate_values or {}),
            distributions=distributions,
            trial_id=record.id,
        )


def _local(moment: datetime.datetime | None) -> datetime.datetime | None:
    """A stored time (UTC) as Optuna's are: naive, in this machine's time zone, so that
    ``datetime.now() - trial.datetime_start`` works as it does there."""
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone().replace(tzinfo=None)


def create_trial(
    *,
    state: TrialState = TrialState.COMPLETE,
    value: float | None = None,
    values: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    distributions: Mapping[str, BaseDistribution] | None = None,
    user_attrs: Mapping[str, Any] | None = None,
    system_attrs: Mapping[str, Any] | None = None,
    intermediate_values: Mapping[int, float] | None = None,
) -> FrozenTrial:
    """A finished trial to add to a study (``study.add_trial``), checked as Optuna checks it:
    one of ``value`` and ``values``, a value for a complete trial, and, when
    ``distributions`` are given, one per parameter holding its value (hpo also takes
    ``params`` alone). What ``add_trial`` stores: params, values, state, user attributes."""
    if value is not None and values is not None:
        raise ValueError("Specify only one of `value` and `values`.")
    vals = list(values) if values is not None else ([value] if value is not None else None)
    if state == TrialState.COMPLETE and vals is None:
        raise ValueError("`value` is supposed to be set for a complete trial.")
    params = dict(params or {})
    if distributions is not None:
        if set(params) != set(distributions):
            raise ValueError(
                f"Inconsistent parameters {sorted(params)} and distributions "
                f"{sorted(distributions)}."
            )
        for name, dist in distributions.items():
            if not dist.contains(params[name]):
                raise ValueError(
                    f"The value {params[name]!r} of parameter {name!r} isn't contained in the "
                    f"distribution {dist}."
                )
    return FrozenTrial(
        number=-1,
        state=state,
        values=vals,
        params=params,
        user_attrs=dict(user_attrs or {}),
        distributions=dict(distributions or {}),
        system_attrs=dict(system_attrs or {}),
        intermediate_values=dict(intermediate_values or {}),
    )


class FixedTrial(FrozenTrial):
    """Optuna's FixedTrial: an objective run outside any study on these ``params``
    (``objective(FixedTrial({"lr": 0.01}))``): each suggest_* answers its value; ``params``
    holds those suggested, and a categorical value not among the choices is a ValueError
    (a number out of range a warning), as in Optuna."""

    def __init__(self, params: Mapping[str, Any], number: int = 0) -> None:
        super().__init__(number=number, state=TrialState.RUNNING, values=None, params={})
        self._given = dict(params)

    def _suggest(self, name: str, dist: BaseDistribution) -> Any:
        if name in self._given:
            value = self._given[name]
            if isinstance(dist, CategoricalDistribution) and not dist.contains(value):
                raise ValueError(f"{value!r} not in {tuple(dist.choices)}.")
            self.params[name] = value
        return super()._suggest(name, dist)


class Trial(_Suggests, TrialHandle):
    """The trial an objective gets: ``suggest_*`` ask the server for a parameter's value
    (learned into the study's space on first use), ``report(value, step)`` streams the
    objective, ``should_prune()`` says whether the pruner stopped it."""

    # Optuna: a trial that returns a value completes (unless the server pruned it already at
    # a report: then it stays pruned and the value is logged, not stored)
    pruned_when_stopped = False

    def __init__(self, study: Any, asked: Any) -> None:
        super().__init__(study._study, asked, study._metric)
        self.study = study  # Optuna's Study: trial.study.stop() ends the optimize under way
        self._values: dict[str, Any] = {}
        self.user_attrs: dict[str, Any] = {}
        self.distributions: dict[str, BaseDistribution] = {}
        self._started = datetime.datetime.now()

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._values)

    @property
    def datetime_start(self) -> datetime.datetime:
        """When the trial was asked (naive local time, as Optuna's)."""
        return self._started

    @params.setter
    def params(self, value: dict[str, Any]) -> None:
        self._fixed = dict(value)

    def report(self, value: Any, step: Any) -> bool:  # type: ignore[override]
        """Optuna's ``report(value, step)`` (hpo's ``report(step, {name: value})`` works too).

        As in Optuna, a multi-objective study takes no reports (NotImplementedError). A value
        that is not finite (a run that diverged) is not stored, since the server keeps
        finite numbers only: it warns, and the pruner judges the trial by its other values.
        """
        if is_number(value) and not isinstance(step, (bool, Mapping)):  # Optuna's order
            if self._multi_objective:
                raise NotImplementedError(
                    "Trial.report is not supported for multi-objective optimization."
                )
            try:  # as Optuna: int(step) (numpy integers, 1.5 as 1), then 0 or more
                step = int(step)
            except (TypeError, ValueError, OverflowError):
                raise TypeError(
                    f"The `step` argument is of type {type(step).__name__} but must be an int."
                ) from None
            if step < 0:
                raise ValueError(f"The `step` argument is {step} but cannot be negative.")
        if is_number(value) and is_step(step) and not math.isfinite(float(value)):
            warnings.warn(
                f"trial {self.number}: report({value}, {step}) is not finite: not stored",
                stacklevel=2,
            )
            return self.should_stop
        return super().report(value, step)

    @property
    def _multi_objective(self) -> bool:
        return len(self._teller.objectives) > 1

    def _suggest(self, name: str, dist: BaseDistribution) -> Any:
        """The value of ``name`` (the server's, asked once per trial). Asked again with
        another kind of domain, log scale or choices, a ValueError as in Optuna; a domain
        the server refuses (low above high...) is a ValueError too."""
        if name in self._values:
            _check_same_kind(self.distributions[name], dist)
            return self._values[name]
        try:
            self._values[name] = self._teller.suggest(self.asked, name, dist.to_param())
        except errors.InvalidInput as exc:
            raise ValueError(str(exc)) from exc
        self.distributions[name] = dist
        return self._values[name]

    def should_prune(self) -> bool:
        """Whether the server's pruner stopped this trial (learned from the last report or
        heartbeat). NotImplementedError in a multi-objective study, as in Optuna."""
        if self._multi_objective:
            raise NotImplementedError(
                "Trial.should_prune is not supported for multi-objective optimization."
            )
        return self.should_stop

    def set_user_attr(self, key: str, value: Any) -> None:
        self._teller.set_user_attr(self.asked, key, value)
        self.user_attrs[key] = value

    def set_system_attr(self, key: str, value: Any) -> None:
        self.set_user_attr(key, value)


def _check_same_kind(before: BaseDistribution, now: BaseDistribution) -> None:
    """Optuna's rule for a parameter suggested twice in one trial (ValueError)."""
    if type(before) is not type(now):
        raise ValueError("Cannot set different distribution kind to the same parameter name.")
    if isinstance(before, (FloatDistribution, IntDistribution)):
        if before.log != now.log:  # type: ignore[union-attr]
            raise ValueError("Cannot set different log configuration to the same parameter name.")
    elif tuple(before.choices) != tuple(now.choices):  # type: ignore[union-attr]
        raise ValueError("CategoricalDistribution does not support dynamic value space.")
