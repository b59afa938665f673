"""Grid search: every combination exactly once, in a stable order."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cached_property
from typing import Any

from hpo.service.errors import GridExhausted, InvalidInput
from hpo.service.samplers.base import Sampler, StudyView, Suggestion
from hpo.service.spec import CategoricalParam, FloatParam, IntParam, StudySpec, lattice_point

MAX_GRID_POINTS = 1_000_000


class GridSampler(Sampler):
    """Trial number ``n`` gets grid point ``n``.

    The order is fixed by the spec alone (parameters in spec order, the last varying fastest;
    a conditional parameter only multiplies the points where it is active), so restarts and
    concurrent askers agree on it: claiming a trial number claims its point.
    """

    name = "grid"
    uses_history = False  # trial number n gets grid point n

    @classmethod
    def check(cls, spec: StudySpec) -> None:
        size = 1
        for pname in spec.parameter_order():
            size *= len(grid_values(pname, spec.space[pname]))
            if size > MAX_GRID_POINTS:
                raise ValueError(
                    f"space: the grid has more than {MAX_GRID_POINTS:,} points; "
                    "use fewer values or another sampler"
                )

    @cached_property
    def points(self) -> list[dict[str, Any]]:
        return grid_points(self.spec)

    def capacity(self) -> int:
        return len(self.points)

    def point(self, number: int) -> dict[str, Any]:
        """Grid point ``number``, the values of trial ``number`` (GridExhausted past the last)."""
        if number >= len(self.points):
            raise GridExhausted(
                f"the grid is exhausted: all {len(self.points)} points have been handed out"
            )
        return self.points[number]

    def suggest(self, view: StudyView) -> Suggestion:
        self.point(view.number)
        info = {"sampler": self.name, "grid_index": view.number, "grid_size": len(self.points)}
        return Suggestion(dict(self.points[view.number]), info)


def grid_values(name: str, param: FloatParam | IntParam | CategoricalParam) -> list[Any]:
    """The values a parameter takes on the grid; ``ValueError`` if it cannot be gridded."""
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    if param.values is not None:
        return list(param.values)
    if isinstance(param, IntParam):
        count = (param.high - param.low) // param.step + 1
        if count > MAX_GRID_POINTS:
            raise ValueError(f"space.{name}: the int range has {count:,} values, too many to grid")
        return list(range(param.low, param.high + 1, param.step))
    if param.step is None:
        raise ValueError(
            f"space.{name}: a float range needs `step` or explicit `values` to be gridded"
        )
    count = math.floor((param.high - param.low) / param.step + 1e-9) + 1
    if count > MAX_GRID_POINTS:
        raise ValueError(f"space.{name}: the float range has {count:,} steps, too many to grid")
    return [lattice_point(param.low, param.step, k) for k in range(count)]


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    """Every valid combination, expanding conditional parameters only where they are active."""
    order = spec.parameter_order()
    values = {n: grid_values(n, spec.space[n]) for n in order}
    points: list[dict[str, Any]] = [{}]
    for name in order:
        expanded: list[dict[str, Any]] = []
        for point in points:
            if spec.is_active(name, point):
                expanded.extend({**point, name: v} for v in values[name])
            else:
                expanded.append(point)
        points = expanded
    return points


def refuse_off_point(
    point: Mapping[str, Any],
    number: int,
    params: Mapping[str, Any],
    where: str = "params",
    *,
    whole: bool = False,
) -> None:
    """Refuse (InvalidInput naming the parameter) values that trial ``number`` of a grid study
    may not take: it runs grid point ``number``, so a trial asked, queued or imported with
    other values would leave that point unrun. ``whole``: every parameter of the point must
    be given (an imported trial's are all it has)."""
    names = dict.fromkeys([*params, *(point if whole else ())])
    for name in names:
        value, want = params.get(name, _MISSING), point.get(name, _MISSING)
        if not _same_value(value, want):
            given = "nothing" if value is _MISSING else repr(value)
            shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise InvalidInput(
                f"{where}.{name}: trial {number} of a grid study runs grid point {number} "
                f"({shown}); {given} would leave that point unrun",
                field=f"{where}.{name}",
            )


_MISSING = object()


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    return a is b if a is _MISSING or b is _MISSING else a == b
