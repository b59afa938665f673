"""What the trainer callbacks share: the trial they report to, the numbers they send, and
when they stop. Imports neither torch nor a trainer."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from typing import Any

from hpo.api.objective import TrialHandle, TrialTeller
from hpo.service import errors

log = logging.getLogger("hpo.api.integrations")


class TrialReporter:
    """Reports a trainer's metrics to one hpo trial and remembers whether it must stop.

    ``trial`` is the handle :meth:`Study.optimize` passes the objective (it then tells the
    outcome: ``pruned`` once the callback stopped training), or a trial from
    :meth:`Study.ask` together with its ``study`` (you tell it yourself; ``pruned`` says
    how). ``metrics`` limits the names reported (default: every finite number).
    """

    def __init__(
        self,
        trial: TrialHandle | Mapping[str, Any],
        study: TrialTeller | None = None,
        metrics: Collection[str] | None = None,
    ) -> None:
        if isinstance(trial, TrialHandle):
            self.handle = trial
        elif study is None:
            raise ValueError("study: needed with a trial from study.ask() (not a TrialHandle)")
        else:
            self.handle = TrialHandle(study, trial)
        self.metrics = set(metrics) if metrics is not None else None
        self.reports = 0

    @property
    def pruned(self) -> bool:
        """True once hpo said the trial should stop (pruned, or its study stopped)."""
        return self.handle.should_stop

    def report(self, step: int, values: Mapping[str, Any]) -> bool:
        """Send the finite numbers of ``values`` at ``step``; True when training must stop.
        Nothing is sent once the trial was told to stop; a trial the server already ended
        (409/404) stops training too."""
        if self.handle.should_stop:
            return True
        numbers = finite_numbers(values, self.metrics)
        if not numbers:
            return False
        try:
            self.handle.report(int(step), numbers)
        except (errors.TrialFinished, errors.Conflict, errors.NotFound) as exc:
            log.warning("trial %d ended on the server: %s; stopping", self.handle.number, exc)
            self.handle.should_stop = True
        self.reports += 1
        return self.handle.should_stop


def finite_numbers(values: Mapping[str, Any], names: Collection[str] | None) -> dict[str, float]:
    """The entries of ``values`` that are finite numbers (a one-element tensor counts), as
    floats; only ``names`` when given."""
    out = {}
    for name, value in values.items():
        if names is not None and name not in names:
            continue
        if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[name] = float(value)
    return out
