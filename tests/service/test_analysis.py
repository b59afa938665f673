"""The dashboard's numbers: downsampled series, parameter importance and contour grids."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest

from hpo.service.analysis import (
    completed,
    contour,
    downsample,
    encode,
    metric_series,
    objective_value,
    param_importance,
    pareto_front,
)
from hpo.service.errors import InvalidInput
from hpo.service.records import TrialRecord
from hpo.service.spec import StudySpec

NOW = datetime(2024, 1, 1, tzinfo=timezone.utc)


def spec(**space: Any) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "s",
            "objective": {"metric": "loss"},
            "sampler": {"type": "random"},
            "space": space,
        }
    )


def trial(number: int, params: dict[str, Any], value: float | None, **over: Any) -> TrialRecord:
    fields: dict[str, Any] = {
        "id": number + 1,
        "study_id": 1,
        "number": number,
        "state": "complete" if value is not None else "running",
        "params": params,
        "value": value,
        "attempts": 1,
        "created_at": NOW,
        "seq": number + 1,
    }
    return TrialRecord(**{**fields, **over})


SPACE = {
    "lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True},
    "noise": {"type": "float", "low": 0.0, "high": 1.0},
    "layers": {"type": "int", "low": 1, "high": 8},
    "opt": {"type": "categorical", "choices": ["sgd", "adam", "rmsprop"]},
}


def synthetic(n: int = 120, seed: int = 0) -> list[TrialRecord]:
    """The objective depends strongly on lr (log scale), a little on opt, not on the rest."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        params = {
            "lr": float(10 ** rng.uniform(-5, 0)),
            "noise": float(rng.uniform()),
            "layers": int(rng.integers(1, 9)),
            "opt": str(rng.choice(["sgd", "adam", "rmsprop"])),
        }
        value = (np.log10(params["lr"]) + 2.5) ** 2 + 0.3 * (params["opt"] == "sgd")
        out.append(trial(i, params, float(value + rng.normal(0, 0.05))))
    return out


# ------------------------------------------------------------------ downsampling


def test_downsample_keeps_short_series_whole() -> None:
    assert downsample([3.0, 1.0, 2.0], 10) == [0, 1, 2]
    assert downsample([], 10) == []


@pytest.mark.parametrize("n", [11, 101, 1000, 10_007])
@pytest.mark.parametrize("max_points", [4, 5, 10, 99, 200])
def test_downsample_bounds_length_and_keeps_ends_and_extrema(n: int, max_points: int) -> None:
    values = np.random.default_rng(n).normal(size=n).cumsum()
    kept = downsample(values.tolist(), max_points)
    assert len(kept) == n if n <= max_points else len(kept) <= max_points
    assert kept == sorted(set(kept)), "indices ascend without repeats"
    assert kept[0] == 0 and kept[-1] == n - 1
    assert int(values.argmin()) in kept and int(values.argmax()) in kept


def test_downsample_keeps_a_spike_anywhere() -> None:
    values = [0.0] * 5000
    values[3217] = 9.0
    values[4999] = -1.0
    kept = downsample(values, 20)
    assert 3217 in kept and 4999 in kept


def test_downsample_refuses_too_few_points() -> None:
    with pytest.raises(ValueError, match="max_points"):
        downsample([1.0] * 10, 3)


def test_metric_series_groups_by_name_dedupes_steps_and_downsamples() -> None:
    points = [("loss", s, 1 / (s + 1)) for s in range(500)]
    points += [("acc", s, s / 10) for s in range(10)]
    points.append(("acc", 3, 7.0))  # a re-sent step
    series = metric_series(points, 50)
    assert set(series) == {"loss", "acc"}
    loss, acc = series["loss"], series["acc"]
    assert loss.n == 500 and len(loss.steps) <= 50
    assert loss.steps[0] == 0 and loss.steps[-1] == 499
    assert loss.values[0] == 1.0 and loss.values[-1] == 1 / 500
    assert acc.n == 10 and acc.steps == list(range(10))
    assert acc.values[3] == 7.0, "the latest value of a step wins"
    assert acc.as_dict()["n"] == 10


# ------------------------------------------------------------------- importance


def test_importance_ranks_the_parameter_that_matters_first() -> None:
    result = param_importance(spec(**SPACE), synthetic())
    names = list(result.importances)
    assert names[0] == "lr", result.importances
    assert result.importances["lr"] > 0.6
    assert sum(result.importances.values()) == pytest.approx(1.0)
    assert all(v >= 0 for v in result.importances.values())
    assert result.n_trials == 120


def test_importance_of_a_categorical_parameter_adds_up_its_columns() -> None:
    rng = np.random.default_rng(1)
    trials = []
    for i in range(90):
        params = {"opt": str(rng.choice(["sgd", "adam", "rmsprop"])), "noise": float(rng.uniform())}
        trials.append(trial(i, params, {"sgd": 3.0, "adam": 1.0, "rmsprop": 2.0}[params["opt"]]))
    result = param_importance(spec(opt=SPACE["opt"], noise=SPACE["noise"]), trials)
    assert list(result.importances) == ["opt", "noise"]
    assert result.importances["opt"] > 0.9


def test_importance_uses_only_complete_trials_and_handles_conditional_params() -> None:
    space = {**SPACE, "momentum": {"type": "float", "low": 0, "high": 1, "when": {"opt": ["sgd"]}}}
    trials = synthetic(80)
    trials = [
        t.model_copy(update={"params": {**t.params, "momentum": 0.5}})
        if t.params["opt"] == "sgd"
        else t
        for t in trials
    ]
    trials.append(trial(500, {"lr": 1e-5, "noise": 0.1, "layers": 1, "opt": "adam"}, None))
    trials.append(
        trial(501, {"lr": 1e-5, "noise": 0.1, "layers": 1, "opt": "adam"}, 99.0, state="pruned")
    )
    result = param_importance(spec(**space), trials)
    assert result.n_trials == 80
    assert set(result.importances) == {"lr", "noise", "layers", "opt", "momentum"}
    assert next(iter(result.importances)) == "lr"


def test_importance_with_too_few_trials_or_a_constant_objective_is_all_zero() -> None:
    s = spec(**SPACE)
    assert param_importance(s, synthetic(1)).importances == dict.fromkeys(SPACE, 0.0)
    flat = [t.model_copy(update={"value": 1.0}) for t in synthetic(20)]
    assert param_importance(s, flat).importances == dict.fromkeys(SPACE, 0.0)


def test_importance_of_a_multi_objective_study_per_objective() -> None:
    s = StudySpec.model_validate(
        {
            "name": "mo",
            "objective": [{"metric": "a"}, {"metric": "b"}],
            "space": {"u": SPACE["noise"], "v": SPACE["noise"]},
        }
    )
    rng = np.random.default_rng(2)
    trials = []
    for i in range(80):
        u, v = float(rng.uniform()), float(rng.uniform())
        trials.append(trial(i, {"u": u, "v": v}, None, state="complete", values=[u * 10, v * 10]))
    assert next(iter(param_importance(s, trials, 0).importances)) == "u"
    assert next(iter(param_importance(s, trials, 1).importances)) == "v"


def test_encode_log_scale_one_hot_and_inactive_values() -> None:
    s = spec(lr=SPACE["lr"], opt=SPACE["opt"])
    trials = [trial(0, {"lr": 1e-3, "opt": "adam"}, 1.0), trial(1, {"opt": "sgd"}, 2.0)]
    x, owners = encode(s, trials, ["lr", "opt"])
    assert owners == ["lr", "opt", "opt", "opt"]
    assert x[0, 0] == pytest.approx(-3.0)
    assert x[1, 0] < -3.0, "an inactive value sits below the observed range"
    assert x[:, 1:].tolist() == [[0, 1, 0], [1, 0, 0]]
    x, owners = encode(s, trials, ["opt"], one_hot=False)
    assert owners == ["opt"] and x[:, 0].tolist() == [1.0, 0.0]


def test_objective_value_and_completed() -> None:
    t = trial(0, {}, None, state="complete", values=[1.0, 2.0])
    assert objective_value(t, 1) == 2.0 and objective_value(t, 2) is None
    assert objective_value(trial(1, {}, 3.0), 0) == 3.0
    assert objective_value(trial(1, {}, 3.0), 1) is None
    trials = [trial(2, {}, 1.0), trial(1, {}, None), trial(0, {}, 2.0)]
    assert [t.number for t in completed(trials)] == [0, 2]


# ---------------------------------------------------------------------- contour


def test_contour_grid_follows_the_objective() -> None:
    s = spec(**SPACE)
    result = contour(s, synthetic(), "lr", "opt", size=10)
    assert result["x"]["name"] == "lr" and result["x"]["log"] is True
    assert len(result["x"]["values"]) == 10
    assert result["y"] == {
        "name": "opt",
        "kind": "categorical",
        "log": False,
        "values": ["sgd", "adam", "rmsprop"],
    }
    z = np.array(result["z"])
    assert z.shape == (3, 10)
    best_column = int(z.mean(axis=0).argmin())
    assert 10**-3.5 < result["x"]["values"][best_column] < 10**-1.5, "lr near 10^-2.5 is best"
    assert z[0].mean() > z[1].mean(), "sgd costs 0.3"
    assert len(result["points"]) == 120 and set(result["points"][0]) == {
        "x",
        "y",
        "value",
        "number",
    }


def test_a_parameter_beyond_float32_is_analysed_as_any_other() -> None:
    """A forest's trees work in float32, where 1e39 is infinite: the fit raised (the
    dashboard's importance and contour answered 500). The same study with the parameter
    scaled down a billion billion times gives the same importances and the same surface."""
    rng = np.random.default_rng(1)
    big = spec(x={"type": "float", "low": 0.0, "high": 1e39}, y=SPACE["noise"])
    small = spec(x={"type": "float", "low": 0.0, "high": 1e21}, y=SPACE["noise"])
    xs, ys = rng.uniform(0, 1, 40), rng.uniform(0, 1, 40)
    values = [float((x - 0.3) ** 2 + 0.1 * y) for x, y in zip(xs, ys, strict=True)]

    def trials(scale: float) -> list[TrialRecord]:
        return [
            trial(i, {"x": float(x * scale), "y": float(y)}, v)
            for i, (x, y, v) in enumerate(zip(xs, ys, values, strict=True))
        ]

    on_big, on_small = param_importance(big, trials(1e39)), param_importance(small, trials(1e21))
    assert next(iter(on_big.importances)) == "x"
    assert on_big.importances == pytest.approx(on_small.importances)
    surface = contour(big, trials(1e39), "x", "y", size=8)
    assert np.isfinite(np.array(surface["z"])).all()
    same = contour(small, trials(1e21), "x", "y", size=8)["z"]
    assert np.allclose(np.array(surface["z"]), np.array(same))
    assert max(surface["x"]["values"]) == pytest.approx(max(xs) * 1e39)


def test_contour_needs_two_trials_and_known_distinct_parameters() -> None:
    s = spec(**SPACE)
    empty = contour(s, synthetic(1), "lr", "opt")
    assert empty["z"] == [] and len(empty["points"]) == 1
    # the axes already say what they will be
    assert (empty["x"]["kind"], empty["x"]["log"]) == ("numeric", True)
    assert (empty["y"]["kind"], empty["y"]["values"]) == ("categorical", [])
    with pytest.raises(InvalidInput) as err:
        contour(s, synthetic(5), "nope", "lr")
    assert err.value.field == "x"
    with pytest.raises(InvalidInput) as err:
        contour(s, synthetic(5), "lr", "lr")
    assert err.value.field == "y"


def _front_by_brute_force(costs: np.ndarray) -> list[int]:
    return [
        i
        for i, c in enumerate(costs)
        if not np.any(np.all(costs <= c, axis=1) & np.any(costs < c, axis=1))
    ]


def test_pareto_front_keeps_the_non_dominated_rows_in_order() -> None:
    costs = np.array([[1.0, 1.0], [0.5, 2.0], [2.0, 0.5], [1.5, 1.5], [1.0, 1.0], [0.5, 3.0]])
    assert pareto_front(costs) == [0, 1, 2, 4]  # ties both stay; [0.5, 3] is beaten by [0.5, 2]
    assert pareto_front(np.empty((0, 2))) == []
    rng = np.random.default_rng(0)
    for _ in range(200):
        costs = rng.integers(0, 5, size=(rng.integers(1, 40), rng.integers(1, 4))).astype(float)
        costs[rng.integers(0, len(costs))] = rng.choice([np.nan, np.inf])
        assert pareto_front(costs) == _front_by_brute_force(costs)
