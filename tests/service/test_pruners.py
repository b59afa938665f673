"""Pruner decisions on hand-made histories."""

from __future__ import annotations

from hpo.service.pruners import make_pruner
from hpo.service.pruners.base import Report
from hpo.service.spec import StudySpec


class History:
    def __init__(
        self,
        at: dict[int, list[float]],
        complete: dict[int, list[float]] | None = None,
        n: int = 10,
    ):
        self.at, self.complete, self.n = at, complete or at, n

    def values_at(self, step: int, *, complete_only: bool = False) -> list[float]:
        source = self.complete if complete_only else self.at
        return list(source.get(step, []))

    def n_complete(self) -> int:
        return self.n


def spec(pruner: dict, direction: str = "maximize") -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "p",
            "objective": {"metric": "acc", "direction": direction},
            "pruner": pruner,
            "space": {"x": {"type": "float", "low": 0, "high": 1}},
        }
    )


def test_asha_rungs_follow_min_steps_times_eta_powers() -> None:
    pruner = make_pruner(
        spec({"type": "asha", "min_steps": 2, "reduction_factor": 3, "max_steps": 50})
    )
    assert pruner.rungs(100) == [2, 6, 18]


def test_asha_keeps_the_top_third_of_a_rung() -> None:
    pruner = make_pruner(spec({"type": "asha", "min_steps": 1, "reduction_factor": 3}))
    history = History({1: [0.9, 0.8, 0.7, 0.6, 0.5]})
    # 6 values at the rung: the top 6 // 3 = 2 continue
    assert pruner.judge(Report(1, 0.85, None), history) is None
    decision = pruner.judge(Report(1, 0.75, None), history)
    assert decision is not None
    assert decision.reason["rung"] == 0 and decision.reason["threshold"] == 0.8
    assert decision.reason["value"] == 0.75 and decision.reason["of"] == 6


def test_asha_judges_a_rung_once_and_respects_direction() -> None:
    pruner = make_pruner(spec({"type": "asha", "min_steps": 1, "reduction_factor": 2}, "minimize"))
    history = History({1: [0.1, 0.2, 0.3], 2: [0.1]})
    assert pruner.judge(Report(1, 0.5, None), history) is not None  # worst loss at rung 1
    # already past rung 1 and rung 2 is not reached: no new judgement
    assert pruner.judge(Report(1, 0.5, 1), history) is None
    assert pruner.judge(Report(2, 0.05, 1), history) is None  # best at rung 2


def test_first_trial_at_a_rung_continues() -> None:
    pruner = make_pruner(spec({"type": "asha"}))
    assert pruner.judge(Report(1, 0.0, None), History({})) is None


def test_median_prunes_below_the_median_of_completed_trials() -> None:
    pruner = make_pruner(spec({"type": "median", "min_steps": 2, "n_startup_trials": 3}))
    history = History({}, complete={3: [0.5, 0.6, 0.7]}, n=3)
    assert pruner.judge(Report(1, 0.0, None), history) is None  # warm-up
    decision = pruner.judge(Report(3, 0.55, 2), history)
    assert decision is not None and decision.reason["threshold"] == 0.6
    assert pruner.judge(Report(3, 0.65, 2), history) is None
    assert pruner.judge(Report(3, 0.1, 2), History({}, {3: [0.5]}, n=2)) is None  # startup


class BracketHistory(History):
    """Values at a step per bracket ``(n, b)`` (the trials whose ``number % n == b``)."""

    def __init__(self, by_bracket: dict[tuple[int, int], dict[int, list[float]]]) -> None:
        super().__init__({})
        self.by_bracket = by_bracket

    def values_at(
        self, step: int, *, complete_only: bool = False, bracket: tuple[int, int] | None = None
    ) -> list[float]:
        assert bracket is not None, "hyperband compares within a bracket only"
        return list(self.by_bracket.get(bracket, {}).get(step, []))


def test_hyperband_brackets_start_later_and_compare_within_themselves() -> None:
    pruner = make_pruner(
        spec({"type": "hyperband", "min_steps": 1, "reduction_factor": 3, "max_steps": 27})
    )
    assert pruner.n_brackets == 4  # first rungs 1, 3, 9, 27 (the last runs to max_steps)
    assert [pruner.rungs(100, b) for b in range(4)] == [[1, 3, 9], [3, 9], [9], []]
    history = BracketHistory({(4, 0): {1: [0.9, 0.8]}, (4, 1): {3: [0.1, 0.2]}})
    # trial 4 (bracket 0) is judged at step 1 among bracket 0 only: last of 3
    decision = pruner.judge(Report(1, 0.5, None, number=4), history)
    assert decision is not None and decision.reason["bracket"] == 0
    assert pruner.judge(Report(1, 0.5, None, number=5), history) is None  # no rung at 1
    # trial 5 (bracket 1) at step 3: best of its bracket, though worse than bracket 0's
    assert pruner.judge(Report(3, 0.3, 2, number=5), history) is None
