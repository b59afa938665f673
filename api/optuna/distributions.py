"""Optuna's distribution classes, each the ``space`` entry of the server it stands for."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def _check_range(low: float, high: float, log: bool, step: float | None, *, least: float) -> None:
    """Optuna's checks of a numeric distribution (ValueError): ``least`` is the lowest
    ``low`` a log scale takes (above 0 for floats, 1 for integers); ``step`` is None or 1
    on a log scale (a float's None, an integer's 1)."""
    if low > high:
        raise ValueError(f"`low <= high` must hold, but got ({low=}, {high=}).")
    if log and not (low > 0.0 and low >= least):
        bound = "> 0" if least == 0 else f">= {least:g}"
        raise ValueError(f"`low {bound}` must hold for `log=True`, but got ({low=}).")
    if log and step is not None:
        raise ValueError("The parameter `step` is not supported when `log` is true.")
    if step is not None and step <= 0:
        raise ValueError(f"`step > 0` must hold, but got {step=}.")


def _on_grid(value: float, low: float, step: float | None) -> bool:
    if step is None:
        return True
    k = (value - low) / step
    return math.isclose(k, round(k), abs_tol=1e-8)


@dataclass(frozen=True)
class FloatDistribution:
    low: float
    high: float
    log: bool = False
    step: float | None = None

    def __post_init__(self) -> None:
        _check_range(self.low, self.high, self.log, self.step, least=0.0)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one of this distribution's."""
        try:
            v = float(value)
        except (TypeError, ValueError):
            return False
        return self.low <= v <= self.high and _on_grid(v, self.low, self.step)

    def to_param(self) -> dict[str, Any]:
        param: dict[str, Any] = {"type": "float", "low": float(self.low), "high": float(self.high)}
        if self.log:
            param["log"] = True
        if self.step is not None:
            param["step"] = float(self.step)
        return param


@dataclass(frozen=True)
class IntDistribution:
    low: int
    high: int
    log: bool = False
    step: int = 1

    def __post_init__(self) -> None:
        step = None if self.step == 1 else self.step
        _check_range(self.low, self.high, self.log, step, least=1)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one of this distribution's."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and _on_grid(value, self.low, self.step)

    def to_param(self) -> dict[str, Any]:
        param: dict[str, Any] = {"type": "int", "low": int(self.low), "high": int(self.high)}
        if self.log:
            param["log"] = True
        if self.step != 1:
            param["step"] = int(self.step)
        return param


@dataclass(frozen=True)
class CategoricalDistribution:
    choices: Sequence[Any]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError("The `choices` must contain one or more elements.")

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one of this distribution's."""
        return any(value == c for c in self.choices)

    def to_param(self) -> dict[str, Any]:
        return {"type": "categorical", "choices": list(self.choices)}


BaseDistribution = FloatDistribution | IntDistribution | CategoricalDistribution


def from_param(param: Mapping[str, Any]) -> BaseDistribution | None:
    """The distribution of a parameter of a study's space (as the server stores it): a
    domain of explicit ``values`` is categorical over them; None for a type not mapped."""
    kind = param.get("type")
    if param.get("values") is not None and kind in ("float", "int"):
        return CategoricalDistribution(tuple(param["values"]))
    if kind == "float":
        step = param.get("step")
        return FloatDistribution(
            float(param["low"]),
            float(param["high"]),
            log=bool(param.get("log")),
            step=None if step is None else float(step),
        )
    if kind == "int":
        return IntDistribution(
            int(param["low"]),
            int(param["high"]),
            log=bool(param.get("log")),
            step=int(param.get("step") or 1),
        )
    if kind == "categorical":
        return CategoricalDistribution(tuple(param["choices"]))
    return None


__all__ = ["BaseDistribution", "CategoricalDistribution", "FloatDistribution", "IntDistribution"]
