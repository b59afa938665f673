"""Optuna's pruner classes, as the settings of the server's pruners they map to."""

from __future__ import annotations

from typing import Any


class BasePruner:
    """A pruner's settings: ``spec`` is the study spec's ``pruner`` part."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec


class NopPruner(BasePruner):
    def __init__(self) -> None:
        super().__init__({"type": "none"})


class MedianPruner(BasePruner):
    """Stops a trial whose value at a step is worse than the median of earlier trials at that
    step, after ``n_startup_trials`` trials and ``n_warmup_steps`` steps."""

    def __init__(
        self, n_startup_trials: int = 5, n_warmup_steps: int = 0, interval_steps: int = 1, **_: Any
    ) -> None:
        spec = {"type": "median", "n_startup_trials": n_startup_trials}
        super().__init__({**spec, "min_steps": max(1, n_warmup_steps)})


class SuccessiveHalvingPruner(BasePruner):
    """Asynchronous successive halving (the server's ``asha``): rungs at ``min_resource``
    times powers of ``reduction_factor`` steps."""

    def __init__(
        self,
        min_resource: int | str = "auto",
        reduction_factor: int = 4,
        min_early_stopping_rate: int = 0,
        **_: Any,
    ) -> None:
        first = min_resource if isinstance(min_resource, int) else 1
        first *= reduction_factor**min_early_stopping_rate
        spec = {"type": "asha", "min_steps": first, "reduction_factor": reduction_factor}
        super().__init__(spec)


class HyperbandPruner(SuccessiveHalvingPruner):
    """Mapped to one bracket of successive halving (the server's ``asha``)."""

    def __init__(
        self, min_resource: int = 1, max_resource: Any = "auto", reduction_factor: int = 3, **_: Any
    ) -> None:
        super().__init__(min_resource, reduction_factor)
        if isinstance(max_resource, int):
            self.spec["max_steps"] = max_resource


__all__ = ["BasePruner", "HyperbandPruner", "MedianPruner", "NopPruner", "SuccessiveHalvingPruner"]
