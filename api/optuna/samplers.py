"""Optuna's sampler classes, as the settings of the server's samplers they map to.

The server samples; these only say which sampler and how. Arguments without a counterpart
are accepted and ignored (docs/optuna.md lists them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._unmapped import DOC, NotMapped
from ._unmapped import unmapped as _unmapped


class BaseSampler:
    """A sampler's settings: ``spec`` is the study spec's ``sampler`` part, ``space`` the
    parameters it declares up front (GridSampler's grid)."""

    def __init__(self, spec: dict[str, Any], space: dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.space = space or {}


class TPESampler(BaseSampler):
    """The server's TPE: parameters first seen at run time are sampled independently, those
    the study already knows jointly with ``multivariate`` (off by default, as in Optuna)."""

    def __init__(
        self,
        *,
        seed: int | None = None,
        n_startup_trials: int = 10,
        multivariate: bool = False,
        constraints_func: Any = None,
        **ignored: Any,
    ) -> None:
        if constraints_func is not None:
            raise NotMapped(
                "TPESampler(constraints_func=) is Optuna's, not mapped by hpo.optuna "
                f"({DOC}): declare `constraints` in a spec of the hpo client instead"
            )
        spec = {"type": "tpe", "seed": seed, "n_startup_trials": n_startup_trials}
        super().__init__({**spec, "multivariate": bool(multivariate)})


class RandomSampler(BaseSampler):
    def __init__(self, seed: int | None = None) -> None:
        super().__init__({"type": "random", "seed": seed})


class GPSampler(BaseSampler):
    def __init__(
        self, *, seed: int | None = None, n_startup_trials: int = 10, **ignored: Any
    ) -> None:
        super().__init__({"type": "gp", "seed": seed, "n_startup_trials": n_startup_trials})


class GridSampler(BaseSampler):
    """Every combination of ``search_space`` ({name: [values]}); the study ends when all were
    handed out."""

    def __init__(self, search_space: Mapping[str, Sequence[Any]], seed: int | None = None) -> None:
        space = {n: {"type": "categorical", "choices": list(v)} for n, v in search_space.items()}
        super().__init__({"type": "grid", "seed": seed}, space)


__all__ = ["BaseSampler", "GPSampler", "GridSampler", "RandomSampler", "TPESampler"]

_SPACE_FIRST = (
    "the hpo client runs it on a space declared up front: "
    "Client().create_study({{..., 'sampler': {{'type': '{0}'}}, 'space': {{...}}}})"
)
__getattr__ = _unmapped(
    "optuna.samplers",
    {
        "CmaEsSampler": _SPACE_FIRST.format("cmaes"),
        "NSGAIISampler": _SPACE_FIRST.format("nsga2"),
        "QMCSampler": _SPACE_FIRST.format("qmc"),
        "NSGAIIISampler": "no counterpart yet",
        "BruteForceSampler": "GridSampler covers a declared grid",
        "PartialFixedSampler": "enqueue_trial fixes parameters of one trial",
    },
)
