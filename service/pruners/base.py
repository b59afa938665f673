"""The pruner contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

from hpo.service.spec import StudySpec


class PruningHistory(Protocol):
    """What a pruner may ask about the other trials of the study (answered from SQL)."""

    def values_at(
        self, step: int, *, complete_only: bool = False, bracket: tuple[int, int] | None = None
    ) -> list[float]:
        """For each other trial that reached ``step``: its watched metric at its first reported
        step >= ``step``; only trials whose ``number % n == b`` when ``bracket`` is (n, b)."""
        ...

    def values_by_trial_at(self, step: int) -> dict[int, float]:
        """``{trial id: value}`` of each other trial that reached ``step``, at its first
        reported step >= ``step``."""
        ...

    def waiting_behind(self, step: int, population: int, grace_s: float = 0.0) -> int:
        """How many trials of a study of ``population`` trials wait for a slot short of
        ``step``: paused at a smaller step, or not created yet (for more than ``grace_s``)."""
        ...

    def n_complete(self) -> int:
        """How many trials of the study have completed."""
        ...

    def trial_values(self) -> dict[int, float]:
        """The judged trial's own values of the watched metric by step: those stored before
        this report and those this report brings (each step once, its first value)."""
        ...

    def best_trial_values(self) -> dict[int, float]:
        """The watched metric by step of the study's best complete trial (as the study's
        ``best_trial`` names it: single objective, feasible first); empty when none."""
        ...


@dataclass(frozen=True)
class Report:
    """One new value of the watched metric for the trial being judged."""

    step: int
    value: float
    previous_step: int | None  # the trial's largest reported step below this one
    number: int = 0  # the trial's number (Hyperband's bracket)


@dataclass(frozen=True)
class PruneDecision:
    """Stop the trial; ``reason`` is stored with it (rung, value, threshold...)."""

    reason: dict[str, Any]


@dataclass(frozen=True)
class PauseDecision:
    """Pause the trial at a rung (it saves a checkpoint and frees its workers) until it is
    promoted; ``reason`` goes into its event history (rung, rank among n, threshold)."""

    reason: dict[str, Any]


class Pruner(ABC):
    """Judges one report at a time. Stateless: everything comes from the spec and history."""

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self.metric = spec.pruned_metric
        self.direction = spec.pruner_direction

    def better(self, a: float, b: float) -> bool:
        return a < b if self.direction == "minimize" else a > b

    @abstractmethod
    def judge(
        self, report: Report, history: PruningHistory
    ) -> PruneDecision | PauseDecision | None:
        """A decision to stop (or pause), or None to let the trial continue."""


class NoPruner(Pruner):
    """Never stops a trial."""

    def judge(self, report: Report, history: PruningHistory) -> PruneDecision | None:
        return None
