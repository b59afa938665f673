"""Pruners: decide from a running trial's metric stream whether to stop it early.

Each pruner is one module; the allow-list in :mod:`hpo.service.algorithms` maps spec names to
it (loaded on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpo.service.algorithms import PRUNERS, load

if TYPE_CHECKING:
    from hpo.service.pruners.base import Pruner
    from hpo.service.spec import StudySpec

__all__ = ["PRUNERS", "make_pruner"]


def make_pruner(spec: StudySpec) -> Pruner:
    """The pruner a study's spec asks for (PBT's exploit decision for a pbt study, the
    schedule's pauses for a replay)."""
    if spec.pbt is not None:
        return load("hpo.service.pbt:PbtPruner")(spec)
    if spec.replay is not None:
        return load("hpo.service.replay:ReplayPruner")(spec)
    return load(PRUNERS[spec.pruner.type])(spec)
