"""JSON text read fast: what the database hands back as text (SQLite's JSON columns, the
curves kept at rest; psycopg's JSON bytes) is parsed by orjson, about ten times faster than
the standard library on the dashboard's pages of curves and trials.

What orjson would read differently is read by the standard library instead, so what comes
back never depends on which parser read it:
- integers past 64 bits: orjson turns them into floats, silently losing digits (2**64 + 1
  comes back 1.8446744073709552e+19). :func:`loads` reads the text again with ``json`` when
  the result holds a float of 2**63 or more in magnitude (such a float written as one reads
  the same either way; it only costs the second read);
- what orjson refuses: ``NaN`` and ``Infinity`` (``json.dumps`` writes them), lone
  surrogates, nesting past its limit.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_BIG = float(2**63)


def loads(text: str | bytes) -> Any:
    """``json.loads(text)``, by orjson where it reads the same."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
    return json.loads(text) if _has_big_float(value) else value


def loads_small_ints(text: str | bytes) -> Any:
    """:func:`loads` for text whose integers are known to fit in 64 bits (the curves kept at
    rest: steps are at most 2**62), read without looking through the result."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _has_big_float(value: Any) -> bool:
    """Whether ``value`` holds a float of 2**63 or more in magnitude, at any depth."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not -_BIG < item < _BIG:  # NaN is never read from orjson: it refuses it
                return True
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return False
