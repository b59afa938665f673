"""Optuna's exceptions that objectives raise."""

from hpo.api.objective import TrialPruned


class OptunaError(Exception):
    pass


__all__ = ["OptunaError", "TrialPruned"]
