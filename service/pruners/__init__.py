"""Pruners: decide from a running trial's metric stream whether to stop it early.

Each pruner is one module; the allow-list maps spec names to it (loaded on first use).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpo.service.pruners.base import Pruner
    from hpo.service.spec import StudySpec

PRUNERS: dict[str, str] = {
    "none": "hpo.service.pruners.base:NoPruner",
    "median": "hpo.service.pruners.median:MedianPruner",
    "asha": "hpo.service.pruners.asha:AshaPruner",
}


def make_pruner(spec: StudySpec) -> Pruner:
    """The pruner a study's spec asks for."""
    module, _, attr = PRUNERS[spec.pruner.type].partition(":")
    return getattr(import_module(module), attr)(spec)
