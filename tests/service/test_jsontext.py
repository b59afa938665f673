"""JSON read back from the database by orjson, or by the standard library where orjson
refuses what ``json.dumps`` wrote: the value never depends on which one read it."""

from __future__ import annotations

import json
import math

import pytest

from hpo.service.db import jsontext


@pytest.mark.parametrize(
    "value",
    [
        {"lr": 1.0, "layers": 3, "name": "a", "ok": True, "none": None, "list": [1, 2.5]},
        [[0, 1, 0.1, 2, 0.2, 1, 0.1, 2, 0.2, 2]],
        {"big": 2**70, "neg": -(2**65)},  # past 64 bits: orjson refuses
        {"bad": "\ud800"},  # a lone surrogate: orjson refuses
        {"x": 1e308, "tiny": 5e-324, "third": 1 / 3},
    ],
)
def test_what_json_dumps_wrote_reads_back_the_same(value: object) -> None:
    text = json.dumps(value)
    assert jsontext.loads(text) == json.loads(text) == value
    assert type(jsontext.loads("1.0")) is float


def test_nan_and_infinity_written_by_json_dumps_read_back() -> None:
    got = jsontext.loads(json.dumps({"nan": math.nan, "inf": math.inf, "ninf": -math.inf}))
    assert math.isnan(got["nan"]) and got["inf"] == math.inf and got["ninf"] == -math.inf


def test_text_that_is_not_json_still_raises() -> None:
    with pytest.raises(ValueError):
        jsontext.loads("{not json")
