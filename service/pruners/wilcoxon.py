"""Wilcoxon signed-rank stopping rule (Optuna's WilcoxonPruner).

Meant for a score averaged over a fixed set of instances (folds, problems, questions): each
step is an instance id, reported in any order, and a trial stops once it is, with p-value
below ``p_threshold``, worse than the study's best trial on the instances both evaluated.
"""

from __future__ import annotations

import warnings

from hpo.service.pruners.base import PruneDecision, Pruner, PruningHistory, Report


class WilcoxonPruner(Pruner):
    """Pair the trial's values with the best trial's at the steps both reported; from
    ``max(2, min_steps)`` pairs on, stop when the one-sided Wilcoxon test says the trial is
    worse (p < ``p_threshold``), unless the trial's mean is as good as the best trial's (the
    safeguard Optuna applies). Needs a single-objective study with a best trial."""

    def judge(self, report: Report, history: PruningHistory) -> PruneDecision | None:
        opts = self.spec.pruner
        best = history.best_trial_values()
        if not best:
            return None
        own = {**history.trial_values(), report.step: report.value}
        common = sorted(set(own) & set(best))
        if len(common) < max(2, opts.min_steps):
            return None
        diffs = [own[s] - best[s] for s in common]
        own_mean = sum(own.values()) / len(own)
        best_mean = sum(best.values()) / len(best)
        if self.direction == "minimize":
            alternative, mean_is_best = "greater", best_mean >= own_mean
        else:
            alternative, mean_is_best = "less", best_mean <= own_mean
        p = _wilcoxon_p(diffs, alternative)
        if p >= opts.p_threshold or mean_is_best:
            return None
        return PruneDecision(
            {
                "pruner": "wilcoxon",
                "step": report.step,
                "metric": self.metric,
                "value": report.value,
                "p_value": p,
                "threshold": opts.p_threshold,
                "paired_steps": len(common),
            }
        )


def _wilcoxon_p(diffs: list[float], alternative: str) -> float:
    import scipy.stats  # loaded on first use: the pruner registry stays light

    with warnings.catch_warnings():  # small samples: scipy warns about its approximation
        warnings.simplefilter("ignore")
        result = scipy.stats.wilcoxon(diffs, alternative=alternative, zero_method="zsplit")
    return float(result.pvalue)
