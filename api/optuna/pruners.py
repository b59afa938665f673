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
        super().__init__(_percentile("median", n_startup_trials, n_warmup_steps))


class PercentilePruner(BasePruner):
    """Stops a trial whose best value so far is outside the best ``percentile`` % of earlier
    trials at that step."""

    def __init__(
        self,
        percentile: float,
        n_startup_trials: int = 5,
        n_warmup_steps: int = 0,
        interval_steps: int = 1,
        **_: Any,
    ) -> None:
        spec = _percentile("percentile", n_startup_trials, n_warmup_steps)
        super().__init__({**spec, "percentile": percentile})


def _percentile(kind: str, n_startup_trials: int, n_warmup_steps: int) -> dict[str, Any]:
    # Optuna's median and percentile rules judge the trial's best value up to the step.
    return {
        "type": kind,
        "n_startup_trials": n_startup_trials,
        "min_steps": n_warmup_steps,
        "compare": "best_so_far",
    }


class ThresholdPruner(BasePruner):
    """Stops a trial whose value leaves [``lower``, ``upper``] (from ``n_warmup_steps``)."""

    def __init__(
        self,
        lower: float | None = None,
        upper: float | None = None,
        n_warmup_steps: int = 0,
        interval_steps: int = 1,
    ) -> None:
        spec = {"type": "threshold", "lower": lower, "upper": upper}
        super().__init__({**spec, "min_steps": n_warmup_steps})


class PatientPruner(BasePruner):
    """Stops a trial that has not improved by more than ``min_delta`` for ``patience``
    steps, when ``wrapped_pruner`` (if any) also would."""

    def __init__(
        self, wrapped_pruner: BasePruner | None, patience: int, min_delta: float = 0.0
    ) -> None:
        spec = {"type": "patient", "patience": patience, "min_delta": min_delta}
        wrapped = None if wrapped_pruner is None else wrapped_pruner.spec
        super().__init__({**spec, "wrapped": wrapped})


class WilcoxonPruner(BasePruner):
    """Stops a trial that a Wilcoxon signed-rank test finds worse than the best trial on the
    instances (steps) both evaluated, with p below ``p_threshold``."""

    def __init__(self, *, p_threshold: float = 0.1, n_startup_steps: int = 2) -> None:
        spec = {"type": "wilcoxon", "p_threshold": p_threshold}
        super().__init__({**spec, "min_steps": max(1, n_startup_steps)})


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


__all__ = [
    "BasePruner",
    "HyperbandPruner",
    "MedianPruner",
    "NopPruner",
    "PatientPruner",
    "PercentilePruner",
    "SuccessiveHalvingPruner",
    "ThresholdPruner",
    "WilcoxonPruner",
]
