"""CMA-ES, NSGA-II and QMC through our Optuna wrapper suggest what Optuna's own samplers do
for the same seeds, with their state kept in the trials' suggestions."""

from __future__ import annotations

import optuna
import pytest

from hpo.service.samplers import _optuna, make_sampler
from hpo.service.samplers.base import ObservedTrial, StudyView
from hpo.service.spec import StudySpec

SPACE = {
    "x": {"type": "float", "low": -3, "high": 3},
    "lr": {"type": "float", "low": 1e-4, "high": 1, "log": True},
    "n": {"type": "int", "low": 1, "high": 8},
}


def spec_of(sampler: dict, objective: object = None, space: dict = SPACE) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "t",
            "objective": objective or {"metric": "loss"},
            "sampler": sampler,
            "space": space,
        }
    )


def losses(p: dict) -> tuple[float, ...]:
    return ((p["x"] - 1) ** 2 + abs(p["n"] - 3), (p["lr"] - 0.01) ** 2 + p["x"] ** 2)


def lockstep(
    spec: StudySpec,
    engine_for: object,
    n: int,
    objectives: int = 1,
    failing: frozenset[int] = frozenset(),
) -> list[dict]:
    """Run ours and Optuna's own study side by side for ``n`` trials (each ask of Optuna's
    uses the sampler ours builds for that trial number; the trials numbered in ``failing``
    fail); returns our suggestions after checking each equals Optuna's."""
    ours = make_sampler(spec)
    directions = ["minimize"] * objectives
    study = optuna.create_study(directions=directions)
    trials: list[ObservedTrial] = []
    out = []
    for number in range(n):
        got = ours.suggest(StudyView(spec, trials, number))
        study.sampler = engine_for(ours.trial_seed(number))
        asked = study.ask()
        theirs = {
            name: _optuna._suggest_one(asked, name, spec.space[name])
            for name in spec.parameter_order()
        }
        assert got.params == theirs, f"trial {number}"
        values = losses(got.params)[:objectives]
        kept = got.info.get("kept", {})
        if number in failing:
            study.tell(asked, state=optuna.trial.TrialState.FAIL)
            trials.append(ObservedTrial(number, "failed", got.params, None, kept=kept))
        else:
            study.tell(asked, list(values))
            trials.append(ObservedTrial(number, "complete", got.params, values, kept=kept))
        out.append(got.info)
    return out


def test_cmaes_suggests_what_optunas_cmaes_does_across_generations() -> None:
    spec = spec_of({"type": "cmaes", "seed": 3, "n_startup_trials": 2, "population_size": 4})

    def engine(seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.CmaEsSampler(
            seed=seed,
            n_startup_trials=2,
            popsize=4,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
        )

    infos = lockstep(spec, engine, 22)
    assert infos[-1]["generation"] >= 4  # generations were closed and the optimizer restored
    assert any(k.startswith("cma:optimizer") for i in infos for k in i["kept"])


def test_nsga2_suggests_what_optunas_nsga2_does_for_two_objectives() -> None:
    two = [{"metric": "a"}, {"metric": "b"}]
    spec = spec_of({"type": "nsga2", "seed": 5, "population_size": 4}, two)

    def engine(seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=4)

    infos = lockstep(spec, engine, 16, objectives=2)
    assert [i["generation"] for i in infos[:9:4]] == [0, 1, 2]
    # A failed trial is no list position in our view of the study: Optuna's trials[number]
    # then named the wrong trial, and past it every ask was an IndexError.
    infos = lockstep(spec, engine, 16, objectives=2, failing=frozenset({1, 6}))
    assert infos[-1]["generation"] >= 2


@pytest.mark.parametrize("scramble", [False, True])
def test_qmc_trial_n_is_optunas_trial_n(scramble: bool) -> None:
    """Optuna's trial 0 is random; each later trial ``n`` is point ``n - 1`` of the sequence,
    ours too, without reading the study's trials."""
    spec = spec_of({"type": "qmc", "seed": 9, "scramble": scramble})
    ours = make_sampler(spec)
    assert not ours.uses_history
    study = optuna.create_study(sampler=optuna.samplers.QMCSampler(seed=9, scramble=scramble))
    for number in range(9):
        asked = study.ask()
        theirs = {name: _optuna._suggest_one(asked, name, p) for name, p in spec.space.items()}
        study.tell(asked, 0.0)
        got = ours.suggest(StudyView(spec, (), number))
        if number > 0:
            assert got.params == theirs and got.info["index"] == number - 1


def test_qmc_scramble_needs_a_seed_and_cmaes_one_objective() -> None:
    with pytest.raises(ValueError, match="seed: required"):
        spec_of({"type": "qmc", "scramble": True})
    two = [{"metric": "a"}, {"metric": "b"}]
    with pytest.raises(ValueError, match="single objective"):
        make_sampler(spec_of({"type": "cmaes"}, two)).check(spec_of({"type": "cmaes"}, two))


@pytest.mark.parametrize("sampler", ["tpe", "gp", "qmc", "cmaes"])
def test_a_float_lattice_keeps_its_high_end(sampler: str) -> None:
    """``low + n * step`` in floats (0.7 + 2 * 0.3 is 1.2999999999999998) is off the decimal
    lattice Optuna checks, and Optuna then drops the top point: 1.3 was never suggested."""
    space = {"x": {"type": "float", "low": 0.7, "high": 1.3, "step": 0.3}}
    spec = spec_of({"type": sampler, "seed": 0}, space=space)
    assert _optuna.distribution(spec.space["x"]).high == 1.3
    ours = make_sampler(spec)
    trials: list[ObservedTrial] = []
    seen = set()
    for number in range(24):
        x = ours.suggest(StudyView(spec, trials, number)).params["x"]
        seen.add(x)
        trials.append(ObservedTrial(number, "complete", {"x": x}, (-x,)))
    assert seen == {0.7, 1.0, 1.3}


@pytest.mark.parametrize("sampler", ["tpe", "gp", "qmc", "cmaes"])
def test_a_lattice_finer_than_1e_12_is_kept(sampler: str) -> None:
    """Suggestions were rounded to 12 decimals: on a 1e-20 lattice in [1e-15, 2e-15] every
    model-based sampler suggested 0.0, outside the range (the random sampler did not)."""
    space = {"x": {"type": "float", "low": 1e-15, "high": 2e-15, "step": 1e-20}}
    spec = spec_of({"type": sampler, "seed": 0}, space=space)
    ours = make_sampler(spec)
    trials: list[ObservedTrial] = []
    for number in range(12):
        x = ours.suggest(StudyView(spec, trials, number)).params["x"]
        assert spec.space["x"].contains(x), (number, x)
        trials.append(ObservedTrial(number, "complete", {"x": x}, (x * 1e15,)))
