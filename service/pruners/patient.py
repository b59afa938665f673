"""Patience (Optuna's PatientPruner): stop a trial that stopped improving, optionally only
when a wrapped pruner agrees."""

from __future__ import annotations

from hpo.service.pruners.base import PruneDecision, Pruner, PruningHistory, Report


class PatientPruner(Pruner):
    """A trial whose best value over its last ``patience + 1`` steps is no better (by more
    than ``min_delta``) than its best before them has stopped improving. Such a trial stops
    when there is no ``wrapped`` pruner, or when the wrapped one (which watches the same
    metric) decides to stop it; any other trial continues."""

    def judge(self, report: Report, history: PruningHistory) -> PruneDecision | None:
        opts = self.spec.pruner
        if report.step < opts.min_steps:
            return None
        own = {s: v for s, v in history.trial_values().items() if s <= report.step}
        own[report.step] = report.value
        steps = sorted(own)
        if len(steps) <= opts.patience + 1:
            return None
        before = [own[s] for s in steps[: -opts.patience - 1]]
        after = [own[s] for s in steps[-opts.patience - 1 :]]
        if self.direction == "minimize":
            stalled = min(before) + opts.min_delta < min(after)
            best_before, best_after = min(before), min(after)
        else:
            stalled = max(before) - opts.min_delta > max(after)
            best_before, best_after = max(before), max(after)
        if not stalled:
            return None
        reason = {
            "pruner": "patient",
            "step": report.step,
            "metric": self.metric,
            "value": report.value,
            "best_before": best_before,
            "best_since": best_after,
            "patience": opts.patience,
        }
        if opts.wrapped is None:
            return PruneDecision(reason)
        decision = self.wrapped().judge(report, history)
        if decision is None:
            return None
        return PruneDecision({**decision.reason, "patient": reason})

    def wrapped(self) -> Pruner:
        """The wrapped pruner, watching this pruner's metric in its direction."""
        from hpo.service.pruners import make_pruner  # the package imports the registry

        inner = self.spec.pruner.wrapped
        assert inner is not None
        inner = inner.model_copy(update={"metric": self.metric, "direction": self.direction})
        return make_pruner(self.spec.model_copy(update={"pruner": inner}))
