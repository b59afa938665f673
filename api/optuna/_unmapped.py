"""What a ported script meets where ``hpo.optuna`` has no counterpart: an error that says
so and where to look, not a bare AttributeError."""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

DOC = 'docs/optuna.md, "What differs"'


class NotMapped(AttributeError, NotImplementedError):
    """An Optuna name ``hpo.optuna`` has no counterpart for. An AttributeError too, so that
    ``hasattr`` and ``getattr(..., default)`` (feature detection) answer as for any name
    a module lacks."""


def unmapped(module: str, names: dict[str, str]) -> Callable[[str], NoReturn]:
    """A module ``__getattr__``: Optuna's names in ``names`` (with what to use instead) raise
    :class:`NotMapped`; any other name the usual AttributeError."""

    def __getattr__(name: str) -> NoReturn:
        _refuse(module, name, names)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def _refuse(owner: str, name: str, names: dict[str, str]) -> None:
    """Raise :class:`NotMapped` for Optuna's ``name`` of ``owner`` when ``names`` lists it."""
    if name in names:
        raise NotMapped(
            f"{owner}.{name} is Optuna's, not mapped by hpo.optuna ({DOC}): {names[name]}"
        )


def unmapped_method(owner: str, names: dict[str, str]) -> Callable[[object, str], NoReturn]:
    """A class ``__getattr__`` (called only for names the class lacks), as :func:`unmapped`
    is a module's."""

    def __getattr__(self: object, name: str) -> NoReturn:
        _refuse(owner, name, names)
        raise AttributeError(f"{owner!r} object has no attribute {name!r}")

    return __getattr__
