"""The allow-lists of sampler and pruner names a study spec may use.

Each name maps to the class that implements it (``"module:Class"``), imported only when a study
needs it. The lists live here, apart from the sampler and pruner packages, so that
:mod:`hpo.service.spec` can validate a name without importing the code that implements it
(which itself imports the spec). Adding a sampler is its module plus one line here.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

SAMPLERS: dict[str, str] = {
    "grid": "hpo.service.samplers.grid:GridSampler",
    "random": "hpo.service.samplers.random:RandomSampler",
    "tpe": "hpo.service.samplers.tpe:TPESampler",
    "gp": "hpo.service.samplers.gp:GPSampler",
    "cmaes": "hpo.service.samplers.cmaes:CmaEsSampler",
    "nsga2": "hpo.service.samplers.nsga2:NSGAIISampler",
    "qmc": "hpo.service.samplers.qmc:QMCSampler",
    "bohb": "hpo.service.samplers.bohb:BohbSampler",
}

PRUNERS: dict[str, str] = {
    "none": "hpo.service.pruners.base:NoPruner",
    "median": "hpo.service.pruners.median:MedianPruner",
    "asha": "hpo.service.pruners.asha:AshaPruner",
    "percentile": "hpo.service.pruners.percentile:PercentilePruner",
    "threshold": "hpo.service.pruners.threshold:ThresholdPruner",
    "patient": "hpo.service.pruners.patient:PatientPruner",
    "wilcoxon": "hpo.service.pruners.wilcoxon:WilcoxonPruner",
    "hyperband": "hpo.service.pruners.hyperband:HyperbandPruner",
}


def load(target: str) -> Any:
    """The object a ``"module:attr"`` entry names (its module is imported on first use).

    Raises ImportError or AttributeError when the entry names nothing.
    """
    module, _, attr = target.partition(":")
    return getattr(import_module(module), attr)
