"""A trial's history: one row per state change, retry or lease expiry."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hpo.service.db.models import Trial, TrialEvent


def add(session: Session, trial: Trial, state: str, detail: str | None = None) -> None:
    """Append a line to the trial's history, stamped with its current attempt."""
    session.add(
        TrialEvent(trial_id=trial.id, state=str(state), attempt=trial.attempts, detail=detail)
    )


def of_trial(session: Session, trial_id: int) -> list[TrialEvent]:
    """The trial's history, oldest first."""
    return list(
        session.scalars(
            select(TrialEvent).where(TrialEvent.trial_id == trial_id).order_by(TrialEvent.id)
        )
    )


def count(session: Session, trial_id: int, state: str) -> int:
    """How many lines of the trial's history record a move to ``state``."""
    stmt = select(func.count()).where(TrialEvent.trial_id == trial_id, TrialEvent.state == state)
    return int(session.scalar(stmt) or 0)
