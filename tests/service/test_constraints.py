"""Constraints: trials are feasible by their reports, the best trial is a feasible one, and
the sampler learns where the feasible region lies."""

from __future__ import annotations

import pytest

from hpo.service.samplers import make_sampler
from hpo.service.samplers.base import ObservedTrial, StudyView
from hpo.service.spec import StudySpec, describe_errors
from hpo.service.studies import MetricInput, StudyService
from tests.conftest import simple_spec

SPACE = {
    "x": {"type": "float", "low": -1.0, "high": 3.0},
    "y": {"type": "float", "low": -1.0, "high": 3.0},
}


def loss(p: dict) -> float:
    """Global optimum at (2, 2), infeasible (x + y = 4 > 1); a local one at (-0.5, -0.5),
    well inside the feasible region x + y <= 1."""
    x, y = p["x"], p["y"]
    return min((x - 2) ** 2 + (y - 2) ** 2, 0.5 + (x + 0.5) ** 2 + (y + 0.5) ** 2)


def test_constrained_tpe_ends_feasible_and_samples_mostly_feasible(service: StudyService) -> None:
    spec = simple_spec(
        "c",
        sampler={"type": "tpe", "seed": 1, "n_startup_trials": 8},
        space=SPACE,
        constraints=["excess <= 0"],
    )
    sid = service.create_study(StudySpec.model_validate(spec)).id
    told: list[tuple[float, bool]] = []
    for _ in range(30):
        t = service.ask(sid)
        excess = t.params["x"] + t.params["y"] - 1  # feasible: x + y <= 1
        service.report(t.id, [MetricInput(1, "excess", excess)])
        service.tell(t.id, value=loss(t.params))
        told.append((loss(t.params), excess <= 0))
    best, front = service.storage.best(sid)
    assert best is not None and front == [best]
    assert best.params["x"] + best.params["y"] <= 1
    assert best.value == min(v for v, ok in told if ok)
    assert min(v for v, _ in told) < best.value  # an infeasible trial was better
    # Random sampling is feasible 28% of the time here, TPE without the constraint ~10%.
    after_warm_up = [ok for _, ok in told[12:]]
    assert sum(after_warm_up) >= 0.6 * len(after_warm_up)
    # A trial that never reports the constraint's metric is not feasible, however good.
    t = service.ask(sid)
    service.tell(t.id, value=-1.0)
    assert service.storage.best(sid)[0] == best


def test_a_study_with_no_feasible_trial_has_no_best(service: StudyService) -> None:
    spec = simple_spec("n", constraints=["loss >= 100"])  # the told value is the metric
    sid = service.create_study(StudySpec.model_validate(spec)).id
    t = service.ask(sid)
    service.tell(t.id, value=1.0)
    assert service.storage.best(sid) == (None, [])


def test_gp_and_nsga2_sample_with_constraints_pending_and_unreported_trials() -> None:
    """Every trial Optuna sees must carry every constraint: a missing report and a pending
    trial (GP's constant liar) are filled in rather than crashing the model."""
    for kind, constraints in (("gp", ["excess <= 0"]), ("nsga2", ["excess <= 0", "loss >= 1"])):
        spec = StudySpec.model_validate(
            {
                "name": "g",
                "objective": {"metric": "loss"},
                "sampler": {"type": kind, "seed": 0, "n_startup_trials": 3, "population_size": 2},
                "space": SPACE,
                "constraints": constraints,
            }
        )
        points = [(0.0, 0.0), (2.0, 2.0), (0.5, 0.2), (-1.0, 1.5)]
        trials = [
            ObservedTrial(i, "complete", {"x": x, "y": y}, (loss({"x": x, "y": y}),), metrics=m)
            for i, ((x, y), m) in enumerate(
                zip(points, [{"excess": -1}, {"excess": 3}, {}, {}], strict=True)
            )
        ]
        trials.append(ObservedTrial(4, "running", {"x": 0.1, "y": 0.1}))
        got = make_sampler(spec).suggest(StudyView(spec, trials, 5))
        assert spec.check_params(got.params) == got.params


@pytest.mark.parametrize(
    ("constraints", "words"),
    [
        (["latency < 3"], "not of the form"),
        (["latency <= fast"], "is not a number"),
        ([{"metric": "latency", "op": "==", "bound": 1}], "'<=' or '>='"),
        (["latency <= nan"], "finite"),
    ],
)
def test_bad_constraints_name_the_field(constraints: list, words: str) -> None:
    with pytest.raises(ValueError) as err:
        StudySpec.model_validate(simple_spec("b", constraints=constraints))
    (error,) = describe_errors(err.value)
    assert error["field"].startswith("constraints[0]") and words in error["message"]


def test_constraints_round_trip_as_strings() -> None:
    spec = StudySpec.model_validate(
        simple_spec(
            "r", constraints=["latency <= 1.25", {"metric": "acc", "op": ">=", "bound": 0.9}]
        )
    )
    assert spec.to_json()["constraints"] == ["latency <= 1.25", "acc >= 0.9"]
    assert StudySpec.model_validate(spec.to_json()) == spec
    assert spec.violations((0.5,), {"latency": 2.0, "acc": 0.95}) == [0.75, pytest.approx(-0.05)]
