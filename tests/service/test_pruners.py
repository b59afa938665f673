"""Pruner decisions on hand-made histories."""

from __future__ import annotations

import pytest

from hpo.service.pruners import make_pruner
from hpo.service.pruners.base import Report
from hpo.service.spec import StudySpec
from hpo.service.studies import MetricInput, StudyService
from tests.conftest import simple_spec


class History:
    def __init__(
        self,
        at: dict[int, list[float]],
        complete: dict[int, list[float]] | None = None,
        n: int = 10,
        own: dict[int, float] | None = None,
        best: dict[int, float] | None = None,
    ):
        self.at, self.complete, self.n = at, complete or at, n
        self.own, self.best = own or {}, best or {}

    def trial_values(self) -> dict[int, float]:
        return dict(self.own)

    def best_trial_values(self) -> dict[int, float]:
        return dict(self.best)

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


def test_median_compares_the_best_so_far_when_asked_as_optuna_does() -> None:
    history = History({}, complete={2: [0.5, 0.6, 0.7]}, n=3, own={1: 0.9})
    current = make_pruner(spec({"type": "median", "n_startup_trials": 0}))
    assert current.judge(Report(2, 0.55, 1), history) is not None  # 0.55 < median 0.6
    optuna_like = make_pruner(
        spec({"type": "median", "n_startup_trials": 0, "compare": "best_so_far"})
    )
    assert optuna_like.judge(Report(2, 0.55, 1), history) is None  # its best so far is 0.9
    worse = History({}, complete={2: [0.5, 0.6, 0.7]}, n=3, own={1: 0.58})
    decision = optuna_like.judge(Report(2, 0.55, 1), worse)
    assert decision is not None and decision.reason["best_so_far"] == 0.58
    # A stored spec without the field keeps judging the current value.
    assert spec({"type": "median"}).pruner.compare == "current"


def test_percentile_keeps_the_best_quarter() -> None:
    values = {3: [0.1, 0.2, 0.3, 0.4, 0.5]}
    keep_25 = make_pruner(spec({"type": "percentile", "percentile": 25, "n_startup_trials": 0}))
    # maximize: kept when at or above the 75th percentile (0.4)
    assert keep_25.judge(Report(3, 0.41, 2), History({}, values)) is None
    decision = keep_25.judge(Report(3, 0.35, 2), History({}, values))
    assert decision is not None and decision.reason["threshold"] == pytest.approx(0.4)
    loss = make_pruner(spec({"type": "percentile", "percentile": 25}, "minimize"))
    assert loss.judge(Report(3, 0.19, 2), History({}, values)) is None  # 25th percentile 0.2
    assert loss.judge(Report(3, 0.25, 2), History({}, values)) is not None


def test_threshold_stops_outside_the_band() -> None:
    band = make_pruner(spec({"type": "threshold", "lower": 0.2, "upper": 0.9}))
    assert band.judge(Report(1, 0.5, None), History({})) is None
    assert band.judge(Report(1, 0.1, None), History({})).reason["bound"] == "lower"
    assert band.judge(Report(2, 0.95, 1), History({})).reason["bound"] == "upper"
    late = make_pruner(spec({"type": "threshold", "lower": 0.2, "min_steps": 5}))
    assert late.judge(Report(4, 0.0, 3), History({})) is None  # warm-up


def test_patient_stops_a_stalled_trial_and_asks_the_wrapped_pruner() -> None:
    stalled = History({}, own={1: 0.5, 2: 0.8, 3: 0.7, 4: 0.75})
    improving = History({}, own={1: 0.5, 2: 0.6, 3: 0.7, 4: 0.75})
    alone = make_pruner(spec({"type": "patient", "patience": 2}))
    decision = alone.judge(Report(5, 0.6, 4), stalled)  # best of the last 3 (0.75) < 0.8
    assert decision is not None and decision.reason["best_before"] == 0.8
    assert alone.judge(Report(5, 0.9, 4), improving) is None
    assert alone.judge(Report(2, 0.1, 1), History({}, own={1: 0.5})) is None  # too few steps
    wrapped = {"type": "median", "n_startup_trials": 0}
    both = make_pruner(spec({"type": "patient", "patience": 2, "wrapped": wrapped}))
    others = History({}, complete={5: [0.5, 0.55, 0.65]}, own=stalled.own)
    assert both.judge(Report(5, 0.6, 4), others) is None  # the median (0.55) keeps it
    others.complete = {5: [0.7, 0.8, 0.9]}
    decision = both.judge(Report(5, 0.6, 4), others)
    assert decision.reason["pruner"] == "median" and decision.reason["patient"]["patience"] == 2


def test_wilcoxon_stops_a_trial_surely_worse_than_the_best() -> None:
    pruner = make_pruner(spec({"type": "wilcoxon", "p_threshold": 0.1}, "minimize"))
    best = {i: 0.1 + 0.01 * i for i in range(6)}  # losses on six instances
    worse = {i: 0.2 + 0.01 * i for i in (4, 0, 2)}  # reported in any order
    history = History({}, own=worse, best=best)
    assert pruner.judge(Report(2, worse[2], 0), history) is None  # 3 pairs: p = 1/8
    four = History({}, own={**worse, 5: 0.3}, best=best)
    decision = pruner.judge(Report(5, 0.3, 4), four)
    assert decision is not None and decision.reason["p_value"] == pytest.approx(1 / 16)
    better = {i: 0.05 for i in range(5)}
    assert pruner.judge(Report(4, 0.05, 3), History({}, own=better, best=best)) is None
    # The safeguard: worse on the pairs, but its mean beats the best trial's mean.
    lucky = History({}, own={0: 0.15, 1: 0.15, 2: 0.15, 3: 0.15}, best={**best, 9: 5.0})
    assert pruner.judge(Report(3, 0.15, 2), lucky) is None
    assert pruner.judge(Report(5, 0.3, 4), History({}, own=four.own)) is None  # no best trial


@pytest.mark.parametrize(
    ("pruner", "field", "words"),
    [
        ({"type": "threshold"}, "pruner.lower", "needs `lower`, `upper`"),
        ({"type": "threshold", "lower": 2, "upper": 1}, "pruner.lower", "above upper"),
        ({"type": "median", "wrapped": {"type": "median"}}, "pruner.wrapped", "only a `patient`"),
        ({"type": "percentile", "percentile": 101}, "pruner.percentile", "less than or equal"),
        ({"type": "median", "compare": "best"}, "pruner.compare", "current"),
        ({"type": "patient", "wrapped": {"type": "nope"}}, "pruner.wrapped.type", "unknown"),
    ],
)
def test_bad_pruner_options_name_the_field(pruner: dict, field: str, words: str) -> None:
    from pydantic import ValidationError

    from hpo.service.spec import describe_errors

    with pytest.raises(ValidationError) as err:
        spec(pruner)
    (error,) = describe_errors(err.value)
    assert error["field"] == field and words in error["message"]


def test_wilcoxon_needs_a_single_objective() -> None:
    with pytest.raises(ValueError, match="wilcoxon compares with the best trial"):
        StudySpec.model_validate(
            {
                "name": "p",
                "objective": [{"metric": "a"}, {"metric": "b"}],
                "pruner": {"type": "patient", "metric": "a", "wrapped": {"type": "wilcoxon"}},
                "space": {"x": {"type": "float", "low": 0, "high": 1}},
            }
        )


def _study(service: StudyService, pruner: dict) -> int:
    spec = StudySpec.model_validate(simple_spec(f"sql-{pruner['type']}", pruner=pruner))
    return service.create_study(spec).id


def _complete(service: StudyService, sid: int, losses: dict[int, float], told: float) -> None:
    t = service.ask(sid)
    assert service.report(t.id, [MetricInput(s, "loss", v) for s, v in losses.items()]) is False
    service.tell(t.id, value=told)


def test_best_so_far_reads_the_trials_own_stored_points(service: StudyService) -> None:
    sid = _study(service, {"type": "median", "n_startup_trials": 1, "compare": "best_so_far"})
    _complete(service, sid, {s: 1.0 for s in range(1, 5)}, 1.0)
    t = service.ask(sid)
    assert service.report(t.id, [MetricInput(1, "loss", 0.5)]) is False
    # 1.5 is worse than the median (1.0), but its best so far (0.5, stored) is not.
    assert service.report(t.id, [MetricInput(2, "loss", 1.5)]) is False
    # Steps judged in one report: step 4's best so far is step 3 of the same report.
    t = service.ask(sid)
    assert service.report(t.id, [MetricInput(3, "loss", 0.2), MetricInput(4, "loss", 1.5)]) is False
    assert service.report(t.id, [MetricInput(5, "loss", 9.0)]) is False  # no trial at step 5
    current = _study(service, {"type": "percentile", "percentile": 50, "n_startup_trials": 1})
    _complete(service, current, {s: 1.0 for s in range(1, 5)}, 1.0)
    t = service.ask(current)
    assert service.report(t.id, [MetricInput(3, "loss", 0.2), MetricInput(4, "loss", 1.5)]) is True


def test_wilcoxon_pairs_the_trial_with_the_best_trials_points(service: StudyService) -> None:
    sid = _study(service, {"type": "wilcoxon", "p_threshold": 0.1})
    _complete(service, sid, {s: 0.1 for s in range(1, 7)}, 0.1)
    t = service.ask(sid)
    for step in (6, 2, 4):  # three pairs: p = 1/8, not sure enough
        assert service.report(t.id, [MetricInput(step, "loss", 0.3)]) is False
    assert service.report(t.id, [MetricInput(1, "loss", 0.3)]) is True  # four: p = 1/16
    assert service.storage.get_trial(t.id).pruned["pruner"] == "wilcoxon"


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


def test_a_trial_pruned_on_another_metric_keeps_its_objectives_value(
    service: StudyService,
) -> None:
    """The pruner watches accuracy while the objective is a loss: the pruned trial's value
    was its accuracy (0.1), which read as a better loss than the complete trial's 0.2."""
    spec = simple_spec(
        "other-metric",
        pruner={
            "type": "median",
            "n_startup_trials": 1,
            "min_steps": 0,
            "metric": "acc",
            "direction": "maximize",
        },
    )
    sid = service.create_study(StudySpec.model_validate(spec)).id
    first = service.ask(sid)
    service.report(first.id, [MetricInput(0, "acc", 0.9), MetricInput(0, "loss", 0.2)])
    service.tell(first.id, value=0.2)
    second = service.ask(sid)
    assert service.report(second.id, [MetricInput(0, "loss", 0.5), MetricInput(0, "acc", 0.1)])
    pruned = service.storage.get_trial(second.id)
    assert pruned.state == "pruned" and pruned.value == 0.5
    assert pruned.pruned["metric"] == "acc" and pruned.pruned["value"] == 0.1
    assert service.storage.get_study(sid).best_trial.id == first.id


def test_asha_ranks_a_rung_without_trials_pruned_below_it(service: StudyService) -> None:
    """Trials that report several steps in one batch (the workers' reporter flushes every
    second) are pruned at the first rung they cross, yet their later points were stored and
    ranked at the next rung: the one trial that passed rung 1 was pruned at rung 2 by two
    trials ASHA had already stopped."""
    spec = simple_spec(
        "batches",
        pruner={"type": "asha", "min_steps": 1, "reduction_factor": 2, "max_steps": 100},
    )
    sid = service.create_study(StudySpec.model_validate(spec)).id
    fixed = {"x": 0.0, "n": 1}
    survivor = service.ask(sid, params=fixed)
    assert not service.report(survivor.id, [MetricInput(1, "loss", 0.1)])
    for first, second in ((0.9, 0.05), (0.8, 0.04)):
        t = service.ask(sid, params=fixed)
        assert service.report(t.id, [MetricInput(1, "loss", first), MetricInput(2, "loss", second)])
        assert service.storage.get_trial(t.id).pruned["step"] == 1
    assert not service.report(survivor.id, [MetricInput(2, "loss", 0.3)])  # alone at rung 2
    assert service.storage.get_trial(survivor.id).state == "running"
