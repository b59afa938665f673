"""Optuna's API on an hpo server: ``import hpo.optuna as optuna`` and keep the script.

``create_study(storage=URL, study_name=, direction(s)=, sampler=, pruner=, load_if_exists=)``,
``study.optimize(objective, n_trials, timeout, n_jobs, callbacks)``, ``trial.suggest_*``,
``trial.report(value, step)``, ``trial.should_prune()``, ``raise optuna.TrialPruned``,
``set_user_attr``, ``best_value`` / ``best_params`` / ``best_trial``, ``trials_dataframe``,
``enqueue_trial``, ``add_trial(s)``. The server stores the study and samples every parameter;
what differs from Optuna is in docs/optuna.md.
"""

from . import distributions, exceptions, logging, pruners, samplers, trial
from ._study import (
    Study,
    StudyDirection,
    create_study,
    delete_study,
    load_study,
)
from ._trial import FrozenTrial, Trial, TrialState, create_trial
from .exceptions import TrialPruned

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
    "load_study",
    "logging",
    "pruners",
    "samplers",
    "trial",
]
