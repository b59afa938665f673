"""Each sampler on its own: grid order, seeded randomness, Bayesian samplers on every
parameter kind, pending trials, and TPE/GP beating random search."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from hpo.service.errors import GridExhausted
from hpo.service.samplers import make_sampler
from hpo.service.samplers.base import ObservedTrial, StudyView
from hpo.service.samplers.grid import GridSampler, grid_values
from hpo.service.spec import StudySpec

MIXED_SPACE = {
    "lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    "warmup": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.05},
    "layers": {"type": "int", "low": 1, "high": 6},
    "width": {"type": "int", "low": 8, "high": 512, "log": True},
    "opt": {"type": "categorical", "choices": ["sgd", "adam"]},
    "momentum": {"type": "float", "low": 0.0, "high": 0.99, "when": {"opt": ["sgd"]}},
}


def spec_of(sampler: str, space: dict, seed: int | None = 0, **extra: object) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "t",
            "objective": {"metric": "loss"},
            "sampler": {"type": sampler, "seed": seed, **extra},
            "space": space,
        }
    )


def test_grid_enumerates_every_point_once_in_a_stable_order() -> None:
    spec = spec_of(
        "grid",
        {
            "opt": {"type": "categorical", "choices": ["sgd", "adam"]},
            "lr": {"type": "float", "low": 0.1, "high": 0.3, "step": 0.1},
            "momentum": {"type": "float", "values": [0.0, 0.9], "when": {"opt": ["sgd"]}},
            "depth": {"type": "int", "low": 1, "high": 3, "step": 2},
        },
    )
    sampler = make_sampler(spec)
    points = [sampler.suggest(StudyView(spec, [], n)).params for n in range(sampler.capacity())]
    # sgd: 3 lr x 2 momentum x 2 depth = 12; adam: 3 lr x 2 depth = 6
    assert len(points) == 18 == len({tuple(sorted(p.items())) for p in points})
    assert points[0] == {"opt": "sgd", "lr": 0.1, "momentum": 0.0, "depth": 1}
    assert points[1] == {"opt": "sgd", "lr": 0.1, "momentum": 0.0, "depth": 3}
    assert all("momentum" not in p for p in points if p["opt"] == "adam")
    assert [p["lr"] for p in points[:12:4]] == [0.1, 0.2, 0.3]  # float steps are exact
    again = make_sampler(spec)
    assert [again.suggest(StudyView(spec, [], n)).params for n in range(18)] == points
    with pytest.raises(GridExhausted, match="exhausted"):
        sampler.suggest(StudyView(spec, [], 18))


@pytest.mark.parametrize(
    ("low", "high", "step", "values"),
    [
        (-0.3, 0.3, 0.1, [-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3]),  # 0, not 5.55e-17
        (1e-300, 1e-299, 3e-300, [1e-300, 4e-300, 7e-300, 1e-299]),  # not all 0
        (100, 1000, 450, [100.0, 550.0, 1000.0]),
        (
            64,
            64.1,
            0.01,
            [64.0, 64.01, 64.02, 64.03, 64.04, 64.05, 64.06, 64.07, 64.08, 64.09, 64.1],
        ),
    ],
)
def test_grid_float_steps_land_on_their_lattice(
    low: float, high: float, step: float, values: list[float]
) -> None:
    param = {"type": "float", "low": low, "high": high, "step": step}
    assert grid_values("x", spec_of("grid", {"x": param}).space["x"]) == values


@pytest.mark.parametrize(
    ("param", "words"),
    [
        ({"type": "float", "low": 0, "high": 1}, "space.x: a float range needs `step`"),
        (
            {"type": "float", "low": 1e-5, "high": 1, "log": True},
            "space.x: a float range needs `step`",
        ),
        ({"type": "int", "low": 0, "high": 10**9}, "too many to grid"),
    ],
)
def test_grid_refuses_spaces_it_cannot_enumerate(param: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("`", ".").replace("(", ".")):
        GridSampler.check(spec_of("grid", {"x": param}))


def test_random_is_reproducible_per_seed_and_trial_number() -> None:
    spec = spec_of("random", MIXED_SPACE, seed=7)
    a = [make_sampler(spec).suggest(StudyView(spec, [], n)).params for n in range(20)]
    b = [make_sampler(spec).suggest(StudyView(spec, [], n)).params for n in range(20)]
    assert a == b
    other = spec_of("random", MIXED_SPACE, seed=8)
    assert [make_sampler(other).suggest(StudyView(other, [], n)).params for n in range(20)] != a
    for p in a:
        assert_in_space(spec, p)


def assert_in_space(spec: StudySpec, params: dict) -> None:
    assert spec.check_params(params) == params
    assert isinstance(params["layers"], int) and isinstance(params["width"], int)
    assert math.isclose(params["warmup"] / 0.05, round(params["warmup"] / 0.05), abs_tol=1e-9)


def objective(p: dict) -> float:
    """A bowl with a conditional bonus: best near lr=1e-2, layers=3, sgd momentum 0.9."""
    loss = (math.log10(p["lr"]) + 2) ** 2 + (p["layers"] - 3) ** 2 * 0.3 + abs(p["warmup"] - 0.1)
    loss += 0.5 * (math.log2(p["width"]) - 6) ** 2 / 9
    loss += (p["momentum"] - 0.9) ** 2 if p["opt"] == "sgd" else 0.3
    return loss


def run(spec: StudySpec, n: int) -> list[ObservedTrial]:
    sampler = make_sampler(spec)
    trials: list[ObservedTrial] = []
    for number in range(n):
        suggestion = sampler.suggest(StudyView(spec, trials, number))
        assert_in_space(spec, suggestion.params)
        trials.append(
            ObservedTrial(number, "complete", suggestion.params, (objective(suggestion.params),))
        )
    return trials


@pytest.mark.parametrize(("kind", "n", "seeds"), [("tpe", 30, 3), ("gp", 16, 2)])
def test_bayesian_samplers_handle_every_parameter_kind_and_beat_random(
    kind: str, n: int, seeds: int
) -> None:
    # GP costs ~1 s per suggestion on 2 cores here: fewer trials (benchmarks/ has the full runs)
    ours, rand = [], []
    for seed in range(seeds):
        ours.append(
            min(t.values[0] for t in run(spec_of(kind, MIXED_SPACE, seed, n_startup_trials=6), n))
        )
        rand.append(min(t.values[0] for t in run(spec_of("random", MIXED_SPACE, seed), n)))
    assert statistics.mean(ours) < statistics.mean(rand)


@pytest.mark.parametrize("kind", ["tpe", "gp"])
def test_pending_trials_spread_parallel_asks(kind: str) -> None:
    spec = spec_of(
        kind,
        {
            "x": {"type": "float", "low": -3, "high": 3},
            "y": {"type": "float", "low": -3, "high": 3},
        },
        seed=1,
        n_startup_trials=5,
    )
    sampler = make_sampler(spec)
    trials = [
        ObservedTrial(i, "complete", {"x": x, "y": y}, (x * x + y * y,))
        for i, (x, y) in enumerate([(-2, 2), (1, 1), (0.5, -0.5), (2, -2), (-1, -1), (0.1, 0.2)])
    ]
    first = sampler.suggest(StudyView(spec, trials, 6))
    assert first.info["n_observations"] == 6
    pending = [*trials, ObservedTrial(6, "running", first.params)]
    second = sampler.suggest(StudyView(spec, pending, 7))
    assert second.info["n_pending"] == 1
    assert second.params != first.params


def test_suggestion_records_why() -> None:
    spec = spec_of("tpe", MIXED_SPACE, seed=3, n_startup_trials=4)
    trials = run(spec, 6)
    info = make_sampler(spec).suggest(StudyView(spec, trials, 6)).info
    assert info["sampler"] == "tpe" and info["n_observations"] == 6 and not info["startup"]
    assert isinstance(info["seed"], int)


def test_multi_objective_tpe() -> None:
    spec = StudySpec.model_validate(
        {
            "name": "mo",
            "objective": [{"metric": "a"}, {"metric": "b", "direction": "maximize"}],
            "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 3},
            "space": {"x": {"type": "float", "low": 0, "high": 1}},
        }
    )
    sampler = make_sampler(spec)
    trials: list[ObservedTrial] = []
    for n in range(8):
        x = sampler.suggest(StudyView(spec, trials, n)).params["x"]
        trials.append(ObservedTrial(n, "complete", {"x": x}, (x, x * x)))
    assert len(trials) == 8


def _random_trial(number: int, state: str) -> ObservedTrial:
    """A random trial of MIXED_SPACE, its loss rounded so that ties occur; pruned trials
    carry intermediate values (a NaN among them, or none at all)."""
    params = RANDOM.suggest(StudyView(RANDOM.spec, [], number)).params
    loss = round(objective(params), 1)
    if state == "complete":
        return ObservedTrial(number, state, params, (loss,))
    if state == "pruned":
        steps = {k: loss + k for k in range(number % 4)}
        if number % 9 == 0 and steps:
            steps[max(steps)] = math.nan
        return ObservedTrial(number, state, params, intermediate=steps)
    return ObservedTrial(number, state, params)


RANDOM = make_sampler(spec_of("random", MIXED_SPACE, seed=2))


@pytest.mark.parametrize(
    ("direction", "total", "pruned", "checks"),
    [
        ("minimize", 3_000, 0.15, (1_003, 1_007, 2_500, 2_990)),
        ("maximize", 3_000, 0.15, (1_003, 2_990)),
        ("minimize", 80, 0.95, (30, 50, 75)),  # "below" needs pruned trials; pending weigh
        ("maximize", 80, 0.3, (30, 50, 75)),
    ],
)
def test_tpe_from_kept_arrays_suggests_what_optuna_does_at_thousands_of_trials(
    direction: str,
    total: int,
    pruned: float,
    checks: tuple[int, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The array-fed TPE step (a study's memo, extended by arrivals that come out of number
    order) suggests exactly what Optuna's own walk over the trials does, with ties, pruned
    trials, a conditional parameter and pending trials, and is the path taken."""
    import optuna

    spec = StudySpec.model_validate(
        {
            "name": "t",
            "objective": {"metric": "loss", "direction": direction},
            "sampler": {"type": "tpe", "seed": 11, "n_startup_trials": 10},
            "space": MIXED_SPACE,
        }
    )
    sampler = make_sampler(spec)
    rng = random.Random(5)
    states = ["pruned" if rng.random() < pruned else "complete" for _ in range(total)]
    final = [_random_trial(n, s) for n, s in enumerate(states)]
    # Trials finish out of number order: shuffled within windows of 8.
    order = []
    for start in range(0, total, 8):
        window = list(range(start, min(total, start + 8)))
        rng.shuffle(window)
        order += window
    memo: dict = {}
    arrivals: list = []
    for done in checks:
        while len(arrivals) < done:
            arrivals.append(sampler.prepare(final[order[len(arrivals)]]))
        finished = set(order[:done])
        top = max(finished) + 1
        trials = [
            final[n] if n in finished else ObservedTrial(n, "running", final[n].params)
            for n in range(top)
        ]
        prepared = [sampler.prepare(t) if t.number in finished else None for t in trials]
        for number in range(top, top + 3):  # three seeds
            expected = sampler.suggest(StudyView(spec, trials, number))
            with monkeypatch.context() as m:  # Optuna's own walk must not be taken
                m.setattr(optuna.samplers.TPESampler, "_sample", None)
                view = StudyView(spec, trials, number, prepared, memo, list(arrivals))
                got = sampler.suggest(view)
            assert got == expected
            assert got.info["n_pending"] == top - done > 0


def test_random_values_on_a_tiny_step_stay_in_their_domain() -> None:
    """A step of 1e-20 was rounded to 12 decimals: every value 0.0, outside [1e-20, 1e-18]."""
    import numpy as np

    from hpo.service.samplers.random import sample_param
    from hpo.service.spec import FloatParam

    rng = np.random.default_rng(0)
    tiny = FloatParam(type="float", low=1e-20, high=1e-18, step=1e-20)
    drawn = {sample_param(tiny, rng) for _ in range(200)}
    assert len(drawn) > 50 and all(tiny.contains(v) for v in drawn)


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_tpe_learns_pruned_trials_by_the_pruners_direction(direction: str) -> None:
    """Every trial is pruned, and its pruned metric (accuracy, maximised, while the objective
    is a loss) says larger x is better. TPE ranked those reports by the loss's direction and
    searched towards the worst x when the two directions differed."""
    from hpo.service.db import make_engine, upgrade_schema
    from hpo.service.storage import Storage
    from hpo.service.studies import MetricInput, StudyService

    engine = make_engine("sqlite://")
    upgrade_schema(engine)
    service = StudyService(Storage(engine))
    sign = 1 if direction == "maximize" else -1
    spec = {
        "name": "pruned-direction",
        "objective": {"metric": "loss", "direction": "minimize"},
        "sampler": {"type": "tpe", "seed": 2, "n_startup_trials": 5},
        "pruner": {
            "type": "threshold",
            "metric": "acc",
            "direction": direction,
            "lower": -10,
            "upper": 10,
        },
        "space": {"x": {"type": "float", "low": 0, "high": 1}},
    }
    sid = service.create_study(StudySpec.model_validate(spec)).id
    late = []
    for i in range(30):
        t = service.ask(sid)
        if i >= 10:
            late.append(t.params["x"])
        service.report(t.id, [MetricInput(step=3, name="acc", value=sign * t.params["x"])])
        service.tell(t.id, state="pruned")
    engine.dispose()
    assert statistics.mean(late) > 0.65, late
