"""Gaussian-process Bayesian optimisation, with Optuna's GPSampler as the engine."""

from __future__ import annotations

import importlib
import math
import threading

import optuna

from hpo.service.samplers import _optuna
from hpo.service.samplers.base import StudyView, Suggestion

# Optuna's GP imports torch (and its own GP modules) on the first suggestion: 3-7 s on a busy
# 2-core machine, paid inside the first GP ask of a process. This module loads when a GP study
# is first validated or asked (hpo.service.algorithms loads samplers on first use), so the
# import starts then, in the background; an ask that arrives first waits on Python's import
# lock for what remains of it, never imports twice.
_GP_MODULES = ("torch", "optuna._gp.gp", "optuna._gp.acqf", "optuna._gp.optim_mixed")
_warming: threading.Thread | None = None
_warming_lock = threading.Lock()


def warm_up() -> threading.Thread:
    """Start importing the GP engine's modules in a daemon thread (once per process); returns
    the thread, so a caller that must not race it (a test, a server's start) may join it."""
    global _warming
    with _warming_lock:
        if _warming is None:
            _warming = threading.Thread(target=_import_gp, name="hpo-gp-warm-up", daemon=True)
            _warming.start()
        return _warming


def _import_gp() -> None:
    for name in _GP_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # no torch: the first GP ask reports it, as before
            return


warm_up()


class GPSampler(_optuna.OptunaBacked):
    """GP with expected improvement over the stored trials.

    The GP itself knows nothing of pending trials, so parallel asks would all land on the same
    maximiser of the acquisition function. Pending trials are therefore added as observations
    with the mean of the completed values ("constant liar", CL-mean) once the model is in use.
    """

    name = "gp"
    slow = True  # the GP fit grows as n³: asks wait a bounded time (service/asking.py)

    def suggest(self, view: StudyView) -> Suggestion:
        seed = self.trial_seed(view.number)
        n_startup = self.spec.sampler.n_startup_trials
        engine = optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=n_startup, warn_independent_sampling=False
        )
        complete = view.complete
        lie = None
        if len(complete) >= n_startup and complete and view.pending:
            columns = zip(*(t.values for t in complete), strict=True)
            # The mean of the parts, not of the sum: values near ±1.8e308 overflow a sum.
            lie = tuple(math.fsum(v / len(complete) for v in col) for col in columns)
        params, observed = _optuna.suggest(engine, view, lie=lie)
        info = {
            "sampler": self.name,
            "seed": seed,
            "n_observations": observed - (len(view.pending) if lie else 0),
            "n_pending": len(view.pending),
            "startup": len(complete) < n_startup,
        }
        return Suggestion(params, info)
