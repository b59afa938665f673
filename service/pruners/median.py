"""Median stopping rule (as in Google Vizier and Optuna's MedianPruner)."""

from __future__ import annotations

from collections.abc import Sequence

from hpo.service.pruners.percentile import PercentilePruner


class MedianPruner(PercentilePruner):
    """Stop a trial whose value at a step is worse than the median of the completed trials'
    values at that step, once ``n_startup_trials`` trials have completed and the trial has
    reported at least ``min_steps`` steps.

    ``compare: best_so_far`` judges the trial's best value up to the step, as Optuna's
    MedianPruner does; ``current`` (the default, and what a stored spec without the field
    means) judges its value at the step.
    """

    name = "median"

    def threshold(self, others: list[float]) -> float:
        return _median(others)


def _median(values: Sequence[float]) -> float:
    """The median, halving before adding: the mean of two values near ±1.8e308 would overflow
    to an infinite threshold, which no JSON column stores."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return ordered[mid - 1] / 2 + ordered[mid] / 2
