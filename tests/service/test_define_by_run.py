"""Define-by-run: a range asked wider than the study's space widens it, where it may."""

from __future__ import annotations

import pytest

from hpo.service.errors import InvalidInput
from hpo.service.spec import StudySpec
from hpo.service.studies import StudyService
from tests.conftest import simple_spec


def _study(service: StudyService, name: str, **over: object) -> int:
    spec = simple_spec(name, define_by_run=True, space={}, **over)
    return service.create_study(StudySpec.model_validate(spec)).id


def _suggest(service: StudyService, sid: int, name: str, param: dict) -> object:
    trial = service.ask(sid)
    value = service.suggest_param(trial.id, name, param)
    service.tell(trial.id, value=1.0)
    return value


def test_a_wider_range_widens_the_space_and_a_bound_off_by_rounding_does_not(
    service: StudyService,
) -> None:
    sid = _study(service, "widen", sampler={"type": "random", "seed": 0})
    _suggest(service, sid, "x", {"type": "float", "low": 0.0, "high": 0.3})
    _suggest(
        service, sid, "x", {"type": "float", "low": 0.0, "high": 0.1 * 3}
    )  # 0.30000000000000004
    assert service.storage.get_study(sid).spec["space"]["x"]["high"] == 0.3
    values = [_suggest(service, sid, "x", {"type": "float", "low": 0.0, "high": 100.0})]
    assert service.storage.get_study(sid).spec["space"]["x"]["high"] == 100.0
    values += [
        _suggest(service, sid, "x", {"type": "float", "low": 0.0, "high": 100.0}) for _ in range(10)
    ]
    assert max(values) > 0.3  # later trials sample the widened space
    _suggest(service, sid, "n", {"type": "int", "low": 0, "high": 10, "step": 2})
    _suggest(service, sid, "n", {"type": "int", "low": 1, "high": 11, "step": 2})  # off its lattice
    assert service.storage.get_study(sid).spec["space"]["n"] == {
        "type": "int",
        "low": 0,
        "high": 10,
        "step": 2,
    }


def test_a_grid_study_keeps_its_grid_whatever_range_a_trial_asks(service: StudyService) -> None:
    sid = service.create_study(
        StudySpec.model_validate(
            simple_spec(
                "grid-dbr",
                define_by_run=True,
                sampler={"type": "grid"},
                space={"n": {"type": "int", "low": 0, "high": 3}},
            )
        )
    ).id
    got = [_suggest(service, sid, "n", {"type": "int", "low": 0, "high": 7}) for _ in range(4)]
    assert got == [0, 1, 2, 3]  # each trial its grid point, in order
    n = service.storage.get_study(sid).spec["space"]["n"]
    assert (n["low"], n["high"]) == (0, 3)


def test_a_value_fixed_at_the_ask_is_checked_and_learned_when_first_suggested(
    service: StudyService,
) -> None:
    """A define-by-run ask may fix a parameter the space does not know yet: the trial's first
    suggest of it refuses a value of another kind (InvalidInput naming ``param``), uses a
    number outside the range (as Optuna uses an enqueued one), and learns the domain."""
    sid = _study(service, "fixed", sampler={"type": "random", "seed": 0})
    trial = service.ask(sid, params={"lr": "x", "opt": "adam"})
    with pytest.raises(InvalidInput) as caught:
        service.suggest_param(trial.id, "lr", {"type": "float", "low": 0.0, "high": 1.0})
    assert caught.value.field == "param" and "'x'" in caught.value.message
    with pytest.raises(InvalidInput):
        service.suggest_param(trial.id, "opt", {"type": "categorical", "choices": ["sgd"]})
    choices = {"type": "categorical", "choices": ["sgd", "adam"]}
    assert service.suggest_param(trial.id, "opt", choices) == "adam"
    assert service.storage.get_study(sid).spec["space"] == {"opt": choices}
    assert service.suggest_param(trial.id, "opt", choices) == "adam"
    assert service.storage.get_trial(trial.id).params == {"lr": "x", "opt": "adam"}
    late = service.ask(sid, params={"x": 7.0})  # before any trial taught the space x
    wider = service.ask(sid, params={"x": 5.0})
    listed = service.ask(sid, params={"k": 3})
    # asked again with a narrower range, a trial gets the value it got (as from Optuna)
    other = service.ask(sid)
    value = service.suggest_param(other.id, "x", {"type": "float", "low": 0.5, "high": 1.0})
    assert service.suggest_param(other.id, "x", {"type": "float", "low": 0, "high": 0.1}) == value
    # a number fixed before another trial taught the space its name is used, as in Optuna
    assert service.suggest_param(late.id, "x", {"type": "float", "low": 0.5, "high": 1.0}) == 7.0
    assert service.storage.get_study(sid).spec["space"]["x"]["high"] == 1.0
    # ... and a range asked that holds it widens the space, as any wider range does
    assert service.suggest_param(wider.id, "x", {"type": "float", "low": 0, "high": 10}) == 5.0
    assert service.storage.get_study(sid).spec["space"]["x"]["high"] == 10
    with pytest.raises(InvalidInput, match="not a value of"):  # not one of the listed values
        service.suggest_param(listed.id, "k", {"type": "int", "values": [1, 2, 4]})
    wrong = service.ask(sid, params={"n": 2.5})
    with pytest.raises(InvalidInput, match="2.5"):
        service.suggest_param(wrong.id, "n", {"type": "int", "low": 0, "high": 9})


@pytest.mark.parametrize(
    "name",
    ["p" * 129, "p" * 300, "a\x00b", "", "my param", "p" * 128 + "\n", "9lives"],
)
def test_a_name_no_parameter_may_have_is_refused_by_every_way_in(
    service: StudyService, name: str
) -> None:
    """A define-by-run study took any name given to an ask, an enqueue or an import:
    PostgreSQL then refused the 128-character column (a 500), SQLite stored it."""
    from hpo.service.warmstart import FinishedTrial

    sid = _study(service, "names")
    ways = {
        "ask": lambda: service.ask(sid, params={name: 1.0}),
        "enqueue": lambda: service.enqueue_trial(sid, {name: 1.0}),
        "import": lambda: service.import_trials(sid, [FinishedTrial({name: 1.0}, value=0.5)]),
    }
    for way, call in ways.items():
        with pytest.raises(InvalidInput, match="a parameter name is a letter") as refused:
            call()
        assert refused.value.field.startswith(("params.", "trials[0].params.")), way
    assert service.storage.list_trials(sid)[0] == []  # nothing stored by any of them
    with pytest.raises(ValueError, match="not a valid identifier"):  # nor in a declared space
        StudySpec.model_validate(
            simple_spec("s", space={name: {"type": "float", "low": 0, "high": 1}})
        )


def test_an_int_parameter_given_a_whole_float_says_so(service: StudyService) -> None:
    sid = service.create_study(StudySpec.model_validate(simple_spec("whole"))).id
    with pytest.raises(InvalidInput, match=r"params.n: 3.0 is not an integer") as refused:
        service.enqueue_trial(sid, {"x": 0.0, "n": 3.0})
    assert refused.value.field == "params.n"
    with pytest.raises(InvalidInput, match=r"params.n: 9 lies outside its domain"):
        service.enqueue_trial(sid, {"x": 0.0, "n": 9})
