"""Median stopping rule (as in Google Vizier and Optuna's MedianPruner)."""

from __future__ import annotations

from collections.abc import Sequence

from hpo.service.pruners.base import PruneDecision, Pruner, PruningHistory, Report


class MedianPruner(Pruner):
    """Stop a trial whose value at a step is worse than the median of the completed trials'
    values at that step, once ``n_startup_trials`` trials have completed and the trial has
    reported at least ``min_steps`` steps."""

    def judge(self, report: Report, history: PruningHistory) -> PruneDecision | None:
        opts = self.spec.pruner
        if report.step < opts.min_steps or history.n_complete() < opts.n_startup_trials:
            return None
        others = history.values_at(report.step, complete_only=True)
        if not others:
            return None
        median = _median(others)
        if self.better(median, report.value):
            return PruneDecision(
                {
                    "pruner": "median",
                    "step": report.step,
                    "metric": self.metric,
                    "value": report.value,
                    "threshold": median,
                    "compared_with": len(others),
                }
            )
        return None


def _median(values: Sequence[float]) -> float:
    """The median, halving before adding: the mean of two values near ±1.8e308 would overflow
    to an infinite threshold, which no JSON column stores."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return ordered[mid - 1] / 2 + ordered[mid] / 2
