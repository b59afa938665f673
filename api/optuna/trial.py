"""``optuna.trial``: the trial classes and states."""

from ._trial import FrozenTrial, Trial, TrialState, create_trial

__all__ = ["FrozenTrial", "Trial", "TrialState", "create_trial"]
