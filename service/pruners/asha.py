"""Asynchronous successive halving (ASHA, Li et al. 2020), stopping variant."""

from __future__ import annotations

from hpo.service.pruners.base import PruneDecision, Pruner, PruningHistory, Report


class AshaPruner(Pruner):
    """Rungs sit at ``min_steps * reduction_factor**k`` steps. When a trial first reaches a
    rung, it continues only if its value there is among the top ``1/reduction_factor`` of all
    values recorded at that rung so far (at least the single best), as ASHA promotes."""

    def rungs(self, up_to: int) -> list[int]:
        opts = self.spec.pruner
        rungs, step = [], opts.min_steps
        while step <= up_to and (opts.max_steps is None or step < opts.max_steps):
            rungs.append(step)
            step *= opts.reduction_factor
        return rungs

    def judge(self, report: Report, history: PruningHistory) -> PruneDecision | None:
        eta = self.spec.pruner.reduction_factor
        before = -1 if report.previous_step is None else report.previous_step
        for k, rung in enumerate(self.rungs(report.step)):
            if rung <= before:
                continue  # judged at this rung already
            values = [*history.values_at(rung), report.value]
            ranked = sorted(values, reverse=self.direction == "maximize")
            keep = max(1, len(values) // eta)
            threshold = ranked[keep - 1]
            if self.better(threshold, report.value):
                return PruneDecision(
                    {
                        "pruner": "asha",
                        "rung": k,
                        "step": rung,
                        "metric": self.metric,
                        "value": report.value,
                        "threshold": threshold,
                        "rank": ranked.index(report.value) + 1,
                        "of": len(values),
                        "kept": keep,
                    }
                )
        return None
