"""Optuna's exceptions: what objectives raise and what its study functions raise."""

from hpo.api.objective import TrialPruned as _TrialPruned


class OptunaError(Exception):
    """The base of Optuna's own exceptions."""


class TrialPruned(_TrialPruned, OptunaError):
    """Raised by an objective to end its trial as pruned."""


class DuplicatedStudyError(OptunaError):
    """``create_study`` of a name taken on the server (without ``load_if_exists``)."""


class UpdateFinishedTrialError(OptunaError, RuntimeError):
    """Optuna's, for ``except`` clauses of ported scripts (a finished trial told again is a
    ValueError here, as in Optuna's ``tell``)."""


class StorageInternalError(OptunaError):
    """Optuna's, for ``except`` clauses of ported scripts (the server's errors are hpo's)."""


class CLIUsageError(OptunaError):
    """Optuna's, for ``except`` clauses of ported scripts."""


class ExperimentalWarning(Warning):
    """Optuna's warning category for experimental features, for ``warnings.filterwarnings``
    in ported scripts (hpo.optuna issues none)."""


__all__ = [
    "CLIUsageError",
    "DuplicatedStudyError",
    "ExperimentalWarning",
    "OptunaError",
    "StorageInternalError",
    "TrialPruned",
    "UpdateFinishedTrialError",
]
