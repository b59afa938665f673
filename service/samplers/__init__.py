"""Samplers: each suggests the parameters of the next trial from the study's stored trials.

A sampler is one module with one :class:`~hpo.service.samplers.base.Sampler` subclass; the
allow-list below maps the names a spec may use to it. Modules load on first use, so naming the
list here costs nothing for the notebook client.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpo.service.samplers.base import Sampler
    from hpo.service.spec import StudySpec

SAMPLERS: dict[str, str] = {
    "grid": "hpo.service.samplers.grid:GridSampler",
    "random": "hpo.service.samplers.random:RandomSampler",
    "tpe": "hpo.service.samplers.tpe:TPESampler",
    "gp": "hpo.service.samplers.gp:GPSampler",
}


def sampler_class(name: str) -> type[Sampler]:
    module, _, attr = SAMPLERS[name].partition(":")
    return getattr(import_module(module), attr)


def make_sampler(spec: StudySpec) -> Sampler:
    """The sampler a study's spec asks for."""
    return sampler_class(spec.sampler.type)(spec)
