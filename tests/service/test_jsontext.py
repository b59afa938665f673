"""JSON read back from the database by orjson, or by the standard library where orjson
refuses what ``json.dumps`` wrote: the value never depends on which one read it."""

from __future__ import annotations

import json
import math

import pytest

from hpo.service.db import jsontext
from hpo.service.spec import StudySpec
from hpo.service.storage import Storage
from hpo.service.studies import StudyService
from tests.conftest import simple_spec


@pytest.mark.parametrize(
    "value",
    [
        {"lr": 1.0, "layers": 3, "name": "a", "ok": True, "none": None, "list": [1, 2.5]},
        [[0, 1, 0.1, 2, 0.2, 1, 0.1, 2, 0.2, 2]],
        # past 64 bits (orjson reads them as floats, losing digits)
        {"big": 2**64 + 1, "neg": -(2**63) - 1, "huge": 3**100, "list": [10**19 + 7]},
        {"u64": 2**64 - 1, "i64": -(2**63), "ns": 1_764_662_400_123_456_789},
        {"bad": "\ud800"},  # a lone surrogate: orjson refuses
        {"x": 1e308, "tiny": 5e-324, "third": 1 / 3},
    ],
)
def test_what_json_dumps_wrote_reads_back_the_same(value: object) -> None:
    text = json.dumps(value)
    for given in (text, text.encode()):  # psycopg hands bytes
        got = jsontext.loads(given)
        assert got == json.loads(text) == value
        assert repr(got) == repr(value)  # the same types: 1.0 stays a float, ints stay ints
    assert type(jsontext.loads("1.0")) is float and type(jsontext.loads("1")) is int


def test_nan_and_infinity_written_by_json_dumps_read_back() -> None:
    got = jsontext.loads(json.dumps({"nan": math.nan, "inf": math.inf, "ninf": -math.inf}))
    assert math.isnan(got["nan"]) and got["inf"] == math.inf and got["ninf"] == -math.inf


def test_text_that_is_not_json_still_raises() -> None:
    with pytest.raises(ValueError):
        jsontext.loads("{not json")


def test_integers_past_64_bits_come_back_from_either_database_as_stored(
    storage: Storage,
) -> None:
    """The reviewer's case: a study's seed or a trial's attribute past 64 bits came back a
    float (the study then failed validation on every read)."""
    service = StudyService(storage)
    spec = simple_spec("big", sampler={"type": "random", "seed": 2**64 + 1})
    sid = service.create_study(StudySpec.model_validate(spec)).id
    trial = service.ask(sid)  # reads the spec back
    attrs = {"run": 18446744073709551617, "neg": -(2**63) - 1, "ok": 2**63 - 1, "f": 1e19}
    service.set_user_attrs(trial.id, attrs)
    got = storage.get_trial(trial.id).user_attrs
    assert got == attrs and repr(got) == repr(attrs)
    assert storage.spec_of(sid).sampler.seed == 2**64 + 1
