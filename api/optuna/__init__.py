"""Optuna's API on an hpo server: ``import hpo.optuna as optuna`` and keep the script.

``create_study(storage=URL, study_name=, direction(s)=, sampler=, pruner=, load_if_exists=)``,
``study.optimize(objective, n_trials, timeout, n_jobs, callbacks)``, ``trial.suggest_*``,
``trial.report(value, step)``, ``trial.should_prune()``, ``raise optuna.TrialPruned``,
``set_user_attr``, ``best_value`` / ``best_params`` / ``best_trial``, ``trials_dataframe``,
``enqueue_trial``, ``add_trial(s)``. The server stores the study and samples every parameter;
what differs from Optuna is in docs/optuna.md.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from . import distributions, exceptions, logging, pruners, samplers, study, trial
from ._study import (
    Study,
    StudyDirection,
    create_study,
    delete_study,
    get_all_study_names,
    load_study,
)
from ._trial import FrozenTrial, Trial, TrialState, create_trial
from ._unmapped import unmapped as _unmapped
from .exceptions import TrialPruned

# The version of Optuna whose API this maps, what ported scripts compare against: the one
# installed beside the server's extra, else the oldest hpo supports (a client-only install)
try:
    __version__ = _version("optuna")
except PackageNotFoundError:
    __version__ = "4.0.0"

__all__ = [
    "FrozenTrial",
    "Study",
    "StudyDirection",
    "Trial",
    "TrialPruned",
    "TrialState",
    "create_study",
    "create_trial",
    "delete_study",
    "distributions",
    "exceptions",
    "get_all_study_names",
    "load_study",
    "logging",
    "pruners",
    "samplers",
    "study",
    "trial",
]

__getattr__ = _unmapped(
    "optuna",
    {
        "get_all_study_summaries": "get_all_study_names(storage), or Client().studies()",
        "copy_study": "Client().study(name).add_trials(...) imports finished trials",
        "visualization": "the dashboard (hpo serve, /) draws the history, importances and contours",
        "importance": "GET /api/v1/studies/{id}/importance, or the dashboard",
        "integration": "docs/integrations.md lists hpo's own",
        "storages": "the storage is the hpo server: pass its URL as storage=",
        "artifacts": "each trial's checkpoints are kept by the server",
    },
)
