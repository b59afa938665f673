"""Percentile stopping rule (Optuna's PercentilePruner): keep the trials in the best part."""

from __future__ import annotations

import numpy as np

from hpo.service.pruners.base import PruneDecision, Pruner, PruningHistory, Report


class PercentilePruner(Pruner):
    """Stop a trial whose value at a step lies outside the best ``percentile`` % of the
    completed trials' values at that step, once ``n_startup_trials`` trials have completed
    and from step ``min_steps`` on.

    With ``compare: best_so_far`` the trial's best value up to the step is judged instead of
    its value at the step (Optuna's rule); ``current`` (the default) judges the latter.
    """

    name = "percentile"

    def threshold(self, others: list[float]) -> float:
        """The worst value still kept among ``others``."""
        kept = self.spec.pruner.percentile
        q = kept if self.direction == "minimize" else 100 - kept
        return float(np.percentile(np.asarray(others, dtype=float), q))

    def judged_value(self, report: Report, history: PruningHistory) -> float:
        """The value the rule compares: at the step, or the best up to it."""
        if self.spec.pruner.compare == "current":
            return report.value
        own = history.trial_values()
        values = [v for step, v in own.items() if step <= report.step] + [report.value]
        return min(values) if self.direction == "minimize" else max(values)

    def judge(self, report: Report, history: PruningHistory) -> PruneDecision | None:
        opts = self.spec.pruner
        if report.step < opts.min_steps or history.n_complete() < opts.n_startup_trials:
            return None
        others = history.values_at(report.step, complete_only=True)
        if not others:
            return None
        threshold = self.threshold(others)
        judged = self.judged_value(report, history)
        if not self.better(threshold, judged):
            return None
        reason = {
            "pruner": self.name,
            "step": report.step,
            "metric": self.metric,
            "value": report.value,
            "threshold": threshold,
            "compared_with": len(others),
        }
        if opts.compare == "best_so_far":
            reason["best_so_far"] = judged
        return PruneDecision(reason)
