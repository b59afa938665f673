"""Metric points: storing a trial's reports, reading them back, and the pruner's questions.

Functions take the caller's session.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from hpo.service.db.models import MetricPoint, Trial
from hpo.service.records import MetricInput, MetricPointRecord
from hpo.service.states import TrialState


def add(session: Session, trial: Trial, points: Sequence[MetricInput], now: datetime) -> None:
    """Store ``points`` for the trial (flushed: later queries in the transaction see them)."""
    session.add_all(
        MetricPoint(
            trial_id=trial.id,
            study_id=trial.study_id,
            step=p.step,
            name=p.name,
            value=float(p.value),
            time=now,
        )
        for p in points
    )
    session.flush()


def last_step(session: Session, trial_id: int, name: str) -> int | None:
    """The newest step the trial reported for metric ``name``, if any."""
    return session.scalar(
        select(func.max(MetricPoint.step)).where(
            MetricPoint.trial_id == trial_id, MetricPoint.name == name
        )
    )


def last_value(session: Session, trial_id: int, name: str) -> float | None:
    """The value at the trial's newest step of metric ``name``, if any."""
    return session.scalar(
        select(MetricPoint.value)
        .where(MetricPoint.trial_id == trial_id, MetricPoint.name == name)
        .order_by(MetricPoint.step.desc(), MetricPoint.id.desc())
        .limit(1)
    )


def last_points(
    session: Session, trial_ids: Sequence[int], name: str
) -> dict[int, dict[int, float]]:
    """``{trial id: {newest step: value}}`` of metric ``name``, for those trials that have one."""
    if not trial_ids:
        return {}
    newest = (
        select(MetricPoint.trial_id, func.max(MetricPoint.step).label("step"))
        .where(MetricPoint.trial_id.in_(trial_ids), MetricPoint.name == name)
        .group_by(MetricPoint.trial_id)
        .subquery()
    )
    rows = session.execute(
        select(MetricPoint.trial_id, MetricPoint.step, MetricPoint.value).join(
            newest,
            and_(
                MetricPoint.trial_id == newest.c.trial_id,
                MetricPoint.step == newest.c.step,
                MetricPoint.name == name,
            ),
        )
    )
    return {trial_id: {int(step): value} for trial_id, step, value in rows}


def of_trial(
    session: Session,
    trial_id: int,
    *,
    name: str | None = None,
    since_step: int | None = None,
    limit: int = 100_000,
) -> list[MetricPointRecord]:
    """The trial's points in step order (of metric ``name``; after ``since_step``)."""
    stmt = (
        select(MetricPoint)
        .where(MetricPoint.trial_id == trial_id)
        .order_by(MetricPoint.step, MetricPoint.id)
        .limit(limit)
    )
    if name is not None:
        stmt = stmt.where(MetricPoint.name == name)
    if since_step is not None:
        stmt = stmt.where(MetricPoint.step > since_step)
    return [
        MetricPointRecord(step=p.step, name=p.name, value=p.value, time=p.time)
        for p in session.scalars(stmt)
    ]


def of_trials(
    session: Session, trial_ids: Sequence[int], *, name: str | None = None
) -> dict[int, list[tuple[str, int, float]]]:
    """``(name, step, value)`` in step order per trial, for many trials in one query."""
    out: dict[int, list[tuple[str, int, float]]] = {t: [] for t in trial_ids}
    if not out:
        return out
    stmt = (
        select(MetricPoint.trial_id, MetricPoint.name, MetricPoint.step, MetricPoint.value)
        .where(MetricPoint.trial_id.in_(list(out)))
        .order_by(MetricPoint.trial_id, MetricPoint.step, MetricPoint.id)
    )
    if name is not None:
        stmt = stmt.where(MetricPoint.name == name)
    for trial_id, metric, step, value in session.execute(stmt):
        out[trial_id].append((metric, step, value))
    return out


class PruningHistory:
    """Answers a pruner's questions about the other trials of a study from ``metric_points``
    (the :class:`hpo.service.pruners.base.PruningHistory` a pruner reads)."""

    def __init__(self, session: Session, study_id: int, trial_id: int, metric: str) -> None:
        self.session = session
        self.study_id = study_id
        self.trial_id = trial_id
        self.metric = metric

    def values_at(self, step: int, *, complete_only: bool = False) -> list[float]:
        """Each other trial's value of the metric at its first step at or after ``step``."""
        first = (
            select(MetricPoint.trial_id, func.min(MetricPoint.step).label("step"))
            .where(
                MetricPoint.study_id == self.study_id,
                MetricPoint.name == self.metric,
                MetricPoint.step >= step,
                MetricPoint.trial_id != self.trial_id,
            )
            .group_by(MetricPoint.trial_id)
            .subquery()
        )
        stmt = select(MetricPoint.value).join(
            first,
            and_(
                MetricPoint.trial_id == first.c.trial_id,
                MetricPoint.step == first.c.step,
                MetricPoint.name == self.metric,
            ),
        )
        if complete_only:
            stmt = stmt.join(Trial, Trial.id == MetricPoint.trial_id).where(
                Trial.state == TrialState.COMPLETE.value
            )
        return _first_per_trial(self.session, stmt)

    def n_complete(self) -> int:
        """How many trials of the study are complete."""
        return self.session.scalar(
            select(func.count()).where(
                Trial.study_id == self.study_id, Trial.state == TrialState.COMPLETE.value
            )
        )


def _first_per_trial(session: Session, stmt: Any) -> list[float]:
    """One value per trial, even when a re-sent batch stored a step twice."""
    rows = session.execute(stmt.add_columns(MetricPoint.trial_id))
    seen: dict[int, float] = {}
    for value, trial_id in rows:
        seen.setdefault(trial_id, value)
    return list(seen.values())
