"""The study spec validates once, with messages that name the field."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from hpo.service.spec import FloatParam, StudySpec, check_new, describe_errors

ISSUE_SPEC = """
name: minilm-bbc-news
objective: {metric: val_accuracy, direction: maximize}
sampler: {type: tpe, seed: 0}
pruner: {type: asha, min_steps: 1, reduction_factor: 3}
budget: {max_trials: 40, max_concurrent: 4, timeout_s: 3600}
resources: {workers_per_trial: 2, gpus_per_worker: 1, cpus_per_worker: 1}
trainable: {name: text-classification, config: {epochs: 3}}
space:
  lr:          {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
  batch_size:  {type: categorical, choices: [16, 32, 64]}
  warmup_frac: {type: float, low: 0.0, high: 0.2, step: 0.05}
  layers:      {type: int, low: 1, high: 6}
  scheduler:   {type: categorical, choices: [cosine, linear, step, exponential]}
  gamma:       {type: float, low: 0.1, high: 0.9, when: {scheduler: [step, exponential]}}
"""


def base(**over: object) -> dict:
    spec = {
        "name": "s",
        "objective": {"metric": "loss"},
        "space": {"x": {"type": "float", "low": 0, "high": 1}},
    }
    spec.update(over)
    return spec


def errors_of(data: dict) -> list[dict[str, str]]:
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(data)
    return describe_errors(info.value)


def test_issue_spec_parses_from_yaml() -> None:
    spec = StudySpec.from_yaml(ISSUE_SPEC)
    assert spec.objectives[0].direction == "maximize"
    assert spec.budget.max_concurrent == 4
    assert spec.trainable and spec.trainable.config == {"epochs": 3}
    assert spec.parameter_order() == [
        "lr",
        "batch_size",
        "warmup_frac",
        "layers",
        "scheduler",
        "gamma",
    ]
    assert spec.is_active("gamma", {"scheduler": "step"})
    assert not spec.is_active("gamma", {"scheduler": "cosine"})
    # JSON round trip keeps the single objective as a mapping
    assert StudySpec.model_validate(spec.to_json()) == spec
    assert spec.to_json()["objective"] == {
        "metric": "val_accuracy",
        "direction": "maximize",
        "scope": "last",
    }


def test_yaml_numbers_in_scientific_notation_are_numbers_and_keys_given_twice_are_errors() -> None:
    spec = StudySpec.from_yaml(
        """
name: sci
objective: {metric: loss}
space:
  lr:    {type: float, low: 1e-5, high: 1E-1, log: true}
  decay: {type: categorical, choices: [1e-3, 1e-4, 3.0e-4, "1e-2"]}
"""
    )
    assert (spec.space["lr"].low, spec.space["lr"].high) == (1e-5, 0.1)
    assert spec.space["decay"].choices == [1e-3, 1e-4, 3e-4, "1e-2"]  # quoted stays a string
    twice = "name: twice\nobjective: {metric: loss}\nbudget: {max_trials: 10}\n"
    twice += "budget: {max_trials: 1000}\nspace: {x: {type: float, low: 0, high: 1}}\n"
    with pytest.raises(ValueError, match="found the key 'budget' twice"):
        StudySpec.from_yaml(twice)
    with pytest.raises(ValueError, match="found the key 'lr' twice"):
        StudySpec.from_yaml("space: {lr: {type: float}, lr: {type: int}}")
    # a merge key's values may be overridden: that is what it is for
    merged = StudySpec.from_yaml(
        "name: m\nobjective: {metric: loss}\n"
        "space:\n  x: &unit {type: float, low: 0, high: 1}\n  y: {<<: *unit, high: 2}\n"
    )
    assert merged.space["y"].high == 2


def test_a_value_no_member_of_a_union_takes_is_one_message_naming_every_kind() -> None:
    errors = errors_of(
        base(space={"c": {"type": "categorical", "choices": [[1, 2], "a", {"b": 1}]}})
    )
    assert errors == [
        {
            "field": f"space.c.choices[{i}]",
            "message": "Input should be a valid boolean, integer, number or string",
        }
        for i in (0, 2)
    ]


def test_multi_objective_list() -> None:
    spec = StudySpec.model_validate(
        base(objective=[{"metric": "acc", "direction": "maximize"}, {"metric": "latency"}])
    )
    assert spec.multi_objective
    assert [o.metric for o in spec.objectives] == ["acc", "latency"]


@pytest.mark.parametrize(
    ("space", "field", "words"),
    [
        (
            {"x": {"type": "float", "low": 2, "high": 1}},
            "space.x",
            "must not be greater than `high`",
        ),
        ({"c": {"type": "categorical", "choices": []}}, "space.c.choices", "must not be empty"),
        (
            {"x": {"type": "float", "low": 0, "high": 1, "log": True}},
            "space.x",
            "> 0 on a log scale",
        ),
        ({"x": {"type": "float", "low": "a", "high": 1}}, "space.x.low", "number"),
        ({"x": {"type": "int", "low": 1.5, "high": 3}}, "space.x.low", "integer"),
        (
            {"x": {"type": "float", "low": 0.1, "high": 1, "step": 0.1, "log": True}},
            "space.x",
            "step",
        ),
        ({"x": {"type": "bogus"}}, "space.x", "type"),
        ({"x": {"type": "float", "high": 1}}, "space.x", "`low` is required"),
        ({"c": {"type": "categorical", "choices": [1, 1]}}, "space.c.choices", "twice"),
        (
            {"x": {"type": "float", "low": 0, "high": 1, "when": {"y": [1]}}},
            "space.x.when",
            "'y' is not a parameter",
        ),
        ({"x": {"type": "float", "low": 0, "high": 1, "typo": 3}}, "space.x.typo", "unknown field"),
        ({}, "space", "at least one parameter"),
    ],
)
def test_bad_spaces_name_the_field(space: dict, field: str, words: str) -> None:
    errs = errors_of(base(space=space))
    assert any(e["field"] == field and words in e["message"] for e in errs), errs


def test_condition_values_must_exist_and_cycles_are_refused() -> None:
    errs = errors_of(
        base(
            space={
                "opt": {"type": "categorical", "choices": ["sgd", "adam"]},
                "m": {"type": "float", "low": 0, "high": 1, "when": {"opt": ["rmsprop"]}},
            }
        )
    )
    assert "'rmsprop' is not a possible value of 'opt'" in errs[0]["message"]
    errs = errors_of(
        base(
            space={
                "a": {"type": "categorical", "choices": [1], "when": {"b": [1]}},
                "b": {"type": "categorical", "choices": [1], "when": {"a": [1]}},
            }
        )
    )
    assert "cycle" in errs[0]["message"]
    # A new study's condition on a continuous float (it almost never takes a listed value,
    # so its child never runs) is refused; a stored one stays readable (test_studies.py).
    child = {"type": "int", "low": 1, "high": 3, "when": {"f": [0.5]}}
    continuous = StudySpec.model_validate(
        base(space={"f": {"type": "float", "low": 0, "high": 1}, "d": child})
    )
    with pytest.raises(ValueError, match="space.d.when.f: 'f' is a continuous float"):
        check_new(continuous)
    for lattice in ({"step": 0.5}, {"values": [0.0, 0.5, 1.0]}):  # a float on a lattice: taken
        f = {"type": "float", "low": 0, "high": 1, **lattice}
        check_new(StudySpec.model_validate(base(space={"f": f, "d": child})))


def test_a_new_spec_with_choices_equal_to_python_or_a_contrary_pruner_direction() -> None:
    """Choices 1 and True were kept apart by the spec but indexed as one by the samplers'
    models (TPE learnt every True trial as 1, and the order of the list decided which one it
    then picked); a pruner direction against its objective's pruned the better trials."""
    for choices, shown in (
        ([1, True], "1 and True"),
        (["a", 0, False], "0 and False"),
        ([2, 1.0, 1], "1.0 and 1"),
    ):
        spec = StudySpec.model_validate(
            base(space={"c": {"type": "categorical", "choices": choices}})
        )
        with pytest.raises(ValueError, match=f"space.c.choices: {shown} are equal"):
            check_new(spec)
    check_new(
        StudySpec.model_validate(
            base(space={"c": {"type": "categorical", "choices": [1, "1", "True", None, 2.5]}})
        )
    )
    contrary = base(pruner={"type": "median", "direction": "maximize"})  # objective: minimize
    with pytest.raises(ValueError, match="pruner.direction: 'maximize' contradicts the obj"):
        check_new(StudySpec.model_validate(contrary))
    other = base(pruner={"type": "median", "metric": "acc", "direction": "maximize"})
    check_new(StudySpec.model_validate(other))  # another metric: its own direction


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"sampler": {"type": "annealing"}}, "sampler.type"),
        ({"pruner": {"type": "sha"}}, "pruner.type"),
        ({"objective": {"metric": "m", "direction": "up"}}, "objective[0].direction"),
        ({"budget": {"max_trials": 0}}, "budget.max_trials"),
        ({"resources": {"cpus_per_worker": 0}}, "resources.cpus_per_worker"),
        ({"name": "has space"}, "name"),
        ({"colour": "red"}, "colour"),
        ({"objective": [{"metric": "a"}, {"metric": "a"}]}, "objective"),
        (
            {"objective": [{"metric": "a"}, {"metric": "b"}], "pruner": {"type": "asha"}},
            "pruner.metric",
        ),
        # whole numbers are whole numbers: true is not 1, "3" and 3.0 are not 3
        ({"max_retries": True}, "max_retries"),
        ({"resources": {"workers_per_trial": "2"}}, "resources.workers_per_trial"),
        ({"pruner": {"type": "asha", "reduction_factor": 3.0}}, "pruner.reduction_factor"),
        ({"sampler": {"type": "tpe", "n_startup_trials": True}}, "sampler.n_startup_trials"),
        ({"pruner": {"type": "median", "mode": "promotion"}}, "pruner.mode"),
        ({"pruner": {"type": "asha", "mode": "pause"}}, "pruner.mode"),
        ({"budget": {"max_steps": 0}}, "budget.max_steps"),
        ({"budget": {"max_worker_seconds": 0}}, "budget.max_worker_seconds"),
        ({"pruner": {"type": "asha", "min_steps": 0}}, "pruner.min_steps"),  # a rung at 0
        ({"pruner": {"type": "median", "min_steps": -1}}, "pruner.min_steps"),
        # a step no 64-bit column holds (the page read 10**400 as Infinity and hung)
        ({"pruner": {"type": "hyperband", "max_steps": 10**400}}, "pruner.max_steps"),
        ({"pruner": {"type": "median", "min_steps": 2**62 + 1}}, "pruner.min_steps"),
        ({"budget": {"max_steps": 2**63}}, "budget.max_steps"),
    ],
)
def test_bad_top_level_fields(over: dict, field: str) -> None:
    errs = errors_of(base(**over))
    assert any(e["field"] == field for e in errs), errs


def test_unknown_sampler_lists_the_known_ones() -> None:
    errs = errors_of(base(sampler={"type": "annealing"}))
    assert "grid, random, tpe, gp" in errs[0]["message"]


@pytest.mark.parametrize(
    ("param", "says"),
    [
        ({"type": "int", "low": 0, "high": 10, "step": 5, "values": [0, 3]}, "value 3 in"),
        ({"type": "float", "low": 0, "high": 1, "step": 0.5, "values": [0.25]}, "value 0.25 in"),
    ],
)
def test_values_off_the_step_lattice_are_refused_for_a_new_study_only(
    param: dict, says: str
) -> None:
    """A new study may not give ``values`` off its ``step`` lattice; a stored one that does
    (older versions took it) still reads back, or its study could not be asked again."""
    spec = StudySpec.model_validate(base(space={"p": param}))
    with pytest.raises(
        ValueError, match=rf"space\.p: {says} `values` is not on the `step` lattice"
    ):
        check_new(spec)
    check_new(StudySpec.model_validate(base(space={"p": {**param, "values": [0]}})))


def test_a_float_domain_takes_no_value_outside_it_however_small_its_range() -> None:
    """The bounds allow a few units in the last place (a rounding), relative
    to their size; an absolute 1e-12 took 9e-13 into [1e-20, 1e-18] and 0 into a log scale."""
    tiny = FloatParam(type="float", low=1e-20, high=1e-18)
    assert tiny.contains(1e-18) and tiny.contains(1e-18 * (1 + 2**-52))
    assert not tiny.contains(9e-13) and not tiny.contains(-9e-13)
    log = FloatParam(type="float", low=1e-13, high=1, log=True)
    assert log.contains(math.exp(math.log(1.0))) and log.contains(1e-13)
    assert not log.contains(0) and not log.contains(-5e-13)
    assert not FloatParam(type="float", low=0, high=1).contains(-1e-13)
    listed = FloatParam(type="float", values=[1e-15, 2e-15])
    assert listed.contains(2e-15) and not listed.contains(9e-13)


def test_check_params_for_conditional_space() -> None:
    spec = StudySpec.from_yaml(ISSUE_SPEC)
    good = {"lr": 1e-4, "batch_size": 16, "warmup_frac": 0.05, "layers": 2, "scheduler": "cosine"}
    assert spec.check_params(good) == good
    with pytest.raises(ValueError, match="params.gamma: inactive"):
        spec.check_params({**good, "gamma": 0.5})
    with pytest.raises(ValueError, match="params.gamma: missing"):
        spec.check_params({**good, "scheduler": "step"})
    with pytest.raises(ValueError, match="outside its domain"):
        spec.check_params({**good, "batch_size": 17})
