"""Samplers: each suggests the parameters of the next trial from the study's stored trials.

A sampler is one module with one :class:`~hpo.service.samplers.base.Sampler` subclass; the
allow-list in :mod:`hpo.service.algorithms` maps the names a spec may use to it. Modules load
on first use, so naming the list costs nothing for the notebook client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpo.service.algorithms import SAMPLERS, load

if TYPE_CHECKING:
    from hpo.service.samplers.base import Sampler
    from hpo.service.spec import StudySpec

__all__ = ["SAMPLERS", "make_sampler", "sampler_class"]


def sampler_class(name: str) -> type[Sampler]:
    """The class registered as ``name``; KeyError for a name not in :data:`SAMPLERS`."""
    return load(SAMPLERS[name])


def make_sampler(spec: StudySpec) -> Sampler:
    """The sampler a study's spec asks for."""
    return sampler_class(spec.sampler.type)(spec)
