"""Optuna's distribution classes, each the ``space`` entry of the server it stands for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FloatDistribution:
    low: float
    high: float
    log: bool = False
    step: float | None = None

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

    def to_param(self) -> dict[str, Any]:
        return {"type": "categorical", "choices": list(self.choices)}


BaseDistribution = FloatDistribution | IntDistribution | CategoricalDistribution

__all__ = ["BaseDistribution", "CategoricalDistribution", "FloatDistribution", "IntDistribution"]
