"""BOHB (``sampler: {type: bohb}``) on a real database: TPE is fitted on the highest rung of
the ASHA pruner with enough observations, learns from trials the pruner stopped there, and
needs a rung pruner."""

from __future__ import annotations

import statistics

import pytest

from hpo.service.errors import InvalidInput
from hpo.service.records import MetricInput
from hpo.service.spec import StudySpec
from hpo.service.studies import StudyService
from tests.conftest import simple_spec

GOOD_X = 0.7
STEPS = 9


def bohb_spec(name: str, **over: object) -> StudySpec:
    spec = simple_spec(
        name,
        sampler={"type": "bohb", "seed": 3, "n_startup_trials": 5},
        pruner={"type": "asha", "min_steps": 1, "reduction_factor": 3, "max_steps": STEPS},
        space={"x": {"type": "float", "low": 0.0, "high": 1.0}},
        budget={"max_trials": 40},
    )
    spec.update(over)
    return StudySpec.model_validate(spec)


def curve(x: float, step: int) -> float:
    """A learning curve whose every step ranks the trials as their final value does."""
    return (x - GOOD_X) ** 2 + 1.0 / step


def run_trial(service: StudyService, study_id: int) -> tuple[float, dict, int]:
    """Ask, train until ASHA stops it (or to the end), tell; returns its x, the suggestion's
    info and the last step reached."""
    trial = service.ask(study_id)
    x = trial.params["x"]
    for step in range(1, STEPS + 1):
        if service.report(trial.id, [MetricInput(step, "loss", curve(x, step))]):
            service.tell(trial.id, state="pruned")
            return x, trial.suggestion or {}, step
    service.tell(trial.id, value=curve(x, STEPS))
    return x, trial.suggestion or {}, STEPS


def test_bohb_fits_the_highest_rung_with_enough_observations(service: StudyService) -> None:
    study_id = service.create_study(bohb_spec("bohb")).id
    reached: list[int] = []  # the last step of every trial so far
    model_xs: list[float] = []  # suggested by TPE on a rung (not at random) after trial 20
    for number in range(40):
        x, info, last = run_trial(service, study_id)
        # what the sampler saw: per rung, the trials that had reached it before this ask
        expected = {r: sum(step >= r for step in reached) for r in (1, 3, 9)}
        expected = {r: n for r, n in expected.items() if n}
        assert info["rungs"] == {str(r): n for r, n in expected.items()}
        enough = [r for r, n in expected.items() if n >= 2]  # 1 parameter + 1
        assert info["rung_step"] == (max(enough) if enough else min(expected, default=None))
        # the model's bad side knows the trials stopped below its rung
        stopped = sum(1 for step in reached if step < info["rung_step"]) if reached else 0
        assert info.get("n_stopped_below", 0) == stopped
        reached.append(last)
        if number >= 20 and not info["random"]:
            model_xs.append(x)
    assert reached.count(STEPS) < 20 and min(reached) == 1  # ASHA stopped most trials early
    # TPE on the rungs closes in on the good region (uniform x: a mean distance of 0.29)
    assert len(model_xs) >= 8
    assert statistics.mean(abs(x - GOOD_X) for x in model_xs) < 0.1


def test_bohb_needs_a_rung_pruner(service: StudyService) -> None:
    spec = bohb_spec("no-rungs", pruner={"type": "median"})
    with pytest.raises(InvalidInput) as exc:
        service.create_study(spec)
    assert exc.value.field == "sampler.type"
    assert "asha" in str(exc.value)


def test_bohb_on_asha_without_max_steps_reads_the_rungs_trials_reached(
    service: StudyService,
) -> None:
    """With no ``max_steps``, the rungs are read up to the highest one a trial reached (the
    ask used to loop for ever building the list of rungs)."""
    spec = bohb_spec("open-ended", pruner={"type": "asha", "min_steps": 1, "reduction_factor": 3})
    study_id = service.create_study(spec).id
    infos = [run_trial(service, study_id)[1] for _ in range(6)]
    assert set(infos[-1]["rungs"]) <= {"1", "3", "9"} and infos[-1]["rungs"]["1"] == 5
