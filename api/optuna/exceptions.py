"""Optuna's exceptions: what objectives raise and what its study functions raise."""

from hpo.api.objective import TrialPruned as _TrialPruned


class OptunaError(Exception):
    """The base of Optuna's own exceptions."""


class TrialPruned(_TrialPruned, OptunaError):
    """Raised by an objective to end its trial as pruned."""


class DuplicatedStudyError(OptunaError):
    """``create_study`` of a name taken on the server (without ``load_if_exists``)."""


__all__ = ["DuplicatedStudyError", "OptunaError", "TrialPruned"]
