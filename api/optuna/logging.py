"""Optuna's logging switches, applied to the ``hpo`` loggers."""

from __future__ import annotations

import logging as _logging

CRITICAL, FATAL, ERROR = _logging.CRITICAL, _logging.FATAL, _logging.ERROR
WARNING, WARN, INFO, DEBUG = _logging.WARNING, _logging.WARN, _logging.INFO, _logging.DEBUG


def set_verbosity(verbosity: int) -> None:
    _logging.getLogger("hpo").setLevel(verbosity)


def get_verbosity() -> int:
    return _logging.getLogger("hpo").getEffectiveLevel()


def disable_default_handler() -> None:
    """Nothing to do: hpo adds no handler of its own."""


def enable_default_handler() -> None:
    """Nothing to do: hpo adds no handler of its own."""
