"""``optuna.trial``: the trial classes and states."""

from ._trial import FixedTrial, FrozenTrial, Trial, TrialState, create_trial

__all__ = ["FixedTrial", "FrozenTrial", "Trial", "TrialState", "create_trial"]
