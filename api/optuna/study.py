"""``optuna.study``: the study classes and functions."""

from ._study import (
    MaxTrialsCallback,
    Study,
    StudyDirection,
    create_study,
    delete_study,
    get_all_study_names,
    load_study,
)

__all__ = [
    "MaxTrialsCallback",
    "Study",
    "StudyDirection",
    "create_study",
    "delete_study",
    "get_all_study_names",
    "load_study",
]
