"""Asynchronous successive halving (ASHA, Li et al. 2020): the stopping and promotion variants.

Rungs sit at ``min_steps * reduction_factor**k`` steps (below ``max_steps``). In ``stopping``
mode a trial that first reaches a rung continues only if it is among the top 1/η of the values
recorded there so far. In ``promotion`` mode every trial pauses at each rung (checkpoint saved,
workers freed); :func:`promotion_order` then says which paused trials are in the top
``floor(n/η)`` of their rung, the ones the next free slot resumes before any new trial starts
(the paper's ``get_job``: the highest rung first).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

from hpo.service.pruners.base import (
    PauseDecision,
    PruneDecision,
    Pruner,
    PruningHistory,
    Report,
)


@dataclass(frozen=True)
class Promotion:
    """A paused trial that may be promoted, and why (stored in its event history)."""

    trial_id: int
    rung: int
    reason: dict[str, Any]


class AshaPruner(Pruner):
    """Rungs sit at ``min_steps * reduction_factor**k`` steps. When a trial first reaches a
    rung, it continues only if its value there is among the top ``1/reduction_factor`` of all
    values recorded at that rung so far (at least the single best), as ASHA promotes. In
    promotion mode it pauses there instead (see the module docstring)."""

    # Hyperband runs several brackets of ASHA side by side; ASHA is its one bracket.
    n_brackets = 1

    def bracket_of(self, number: int) -> int:
        """The bracket of trial ``number`` (trials compete only within their bracket)."""
        return number % self.n_brackets

    def first_rung(self, bracket: int) -> int:
        """The first rung of ``bracket``: ``min_steps * reduction_factor**bracket``."""
        opts = self.spec.pruner
        return opts.min_steps * opts.reduction_factor**bracket

    def rungs(self, up_to: int, bracket: int = 0) -> list[int]:
        opts = self.spec.pruner
        rungs, step = [], self.first_rung(bracket)
        while step <= up_to and (opts.max_steps is None or step < opts.max_steps):
            rungs.append(step)
            step *= opts.reduction_factor
        return rungs

    def _peers(self, bracket: int) -> tuple[int, int] | None:
        """The history filter of a bracket's trials (None: all trials, one bracket)."""
        return None if self.n_brackets == 1 else (self.n_brackets, bracket)

    @property
    def promotion(self) -> bool:
        return self.spec.pruner.mode == "promotion"

    def judge(
        self, report: Report, history: PruningHistory
    ) -> PruneDecision | PauseDecision | None:
        eta = self.spec.pruner.reduction_factor
        before = -1 if report.previous_step is None else report.previous_step
        bracket = self.bracket_of(report.number)
        peers = self._peers(bracket)
        for k, rung in enumerate(self.rungs(report.step, bracket)):
            if rung <= before:
                continue  # judged at this rung already
            others = (
                history.values_at(rung) if peers is None else history.values_at(rung, bracket=peers)
            )
            values = [*others, report.value]
            ranked = sorted(values, reverse=self.direction == "maximize")
            if self.promotion:
                return PauseDecision(self._standing(k, rung, report.value, ranked, bracket))
            keep = max(1, len(values) // eta)
            threshold = ranked[keep - 1]
            if self.better(threshold, report.value):
                return PruneDecision(
                    {
                        "pruner": self.spec.pruner.type,
                        **({"bracket": bracket} if self.n_brackets > 1 else {}),
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

    def _standing(
        self,
        k: int,
        rung: int,
        value: float,
        ranked: list[float],
        bracket: int = 0,
        *,
        final: bool = False,
    ) -> dict[str, Any]:
        """Where ``value`` stands among the ``ranked`` values of rung ``k``: its rank, how many
        of them may be promoted (``floor(n/η)``; at least 1 when ``final``: no trial can reach
        the rung any more) and the value the last of those has."""
        promotable = len(ranked) // self.spec.pruner.reduction_factor
        if final:
            promotable = max(1, promotable)
        return {
            "pruner": self.spec.pruner.type,
            "mode": "promotion",
            **({"bracket": bracket} if self.n_brackets > 1 else {}),
            "rung": k,
            "step": rung,
            "metric": self.metric,
            "value": value,
            "rank": ranked.index(value) + 1,
            "of": len(ranked),
            "promotable": promotable,
            "threshold": ranked[promotable - 1] if promotable else None,
        }

    def promotion_order(
        self,
        paused: dict[int, int],
        values: dict[int, dict[int, float]],
        bracket: int = 0,
        *,
        final: bool = False,
    ) -> list[Promotion]:
        """The paused trials that may be promoted now, in the order to promote them: the
        highest rung first, then the best value. ``paused`` maps each paused trial to the
        step it paused at (its ranked metric's); ``values[rung step]`` maps every trial that
        reached that rung (paused or not) to its value there. A trial paused at rung k is
        promotable when its value is among the top ``floor(n_k/η)`` of the ``n_k`` values at
        rung k as they are now. A promoted trial keeps its promotion when later values push it
        out of that top set (as in the ASHA paper), so over a study more than ``floor(n_k/η)``
        may leave rung k; at any moment at most ``floor(n_k/η)`` of the trials at rung k are in
        the top set. With ``final`` (no trial can reach a rung any more) the top set of a
        rung holds at least its best trial."""
        out = []
        sign = -1 if self.direction == "maximize" else 1
        top = max(paused.values(), default=0)
        rungs = self.rungs(top, bracket)
        eta = self.spec.pruner.reduction_factor
        # each rung ranked once (not once per paused trial): rank by trial, values in order
        ranking: dict[int, tuple[dict[int, int], list[float]]] = {}
        for trial_id, last in paused.items():
            k = bisect_right(rungs, last) - 1
            if k < 0:
                continue
            rung = rungs[k]
            at_rung = values.get(rung, {})
            if trial_id not in at_rung:
                continue
            if rung not in ranking:
                # ties broken by trial id, so no more than floor(n/η) are ever in the top set
                order = sorted(at_rung, key=lambda t: (sign * at_rung[t], t))
                rank_of = {t: i for i, t in enumerate(order, 1)}
                ranking[rung] = (rank_of, [at_rung[t] for t in order])
            rank_of, ranked = ranking[rung]
            top = max(1, len(ranked) // eta) if final else len(ranked) // eta
            if rank_of[trial_id] <= top:
                standing = self._standing(k, rung, at_rung[trial_id], ranked, bracket, final=final)
                standing["rank"] = rank_of[trial_id]
                out.append(Promotion(trial_id, k, standing))
        out.sort(key=lambda p: (-p.reason["step"], sign * p.reason["value"], p.trial_id))
        return out
