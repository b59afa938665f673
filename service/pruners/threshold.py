"""Threshold stopping rule (Optuna's ThresholdPruner): stop a trial whose value leaves a band."""

from __future__ import annotations

from hpo.service.pruners.base import PruneDecision, Pruner, PruningHistory, Report


class ThresholdPruner(Pruner):
    """Stop a trial as soon as its value at a step (from ``min_steps`` on) is below ``lower``
    or above ``upper``; either bound may be left out. Other trials play no part."""

    def judge(self, report: Report, history: PruningHistory) -> PruneDecision | None:
        opts = self.spec.pruner
        if report.step < opts.min_steps:
            return None
        if opts.lower is not None and report.value < opts.lower:
            bound, side = opts.lower, "lower"
        elif opts.upper is not None and report.value > opts.upper:
            bound, side = opts.upper, "upper"
        else:
            return None
        return PruneDecision(
            {
                "pruner": "threshold",
                "step": report.step,
                "metric": self.metric,
                "value": report.value,
                "threshold": bound,
                "bound": side,
            }
        )
