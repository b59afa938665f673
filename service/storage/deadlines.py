"""Running trials past a deadline: no progress within ``progress_timeout_s``, an attempt
longer than ``budget.trial_timeout_s``, a study past ``budget.timeout_s``.

Progress is a *new* metric point of the current attempt: heartbeats store nothing, and a
re-sent point is not stored again, so neither moves the deadline. An attempt's progress
deadline is ``progress_timeout_s`` after its newest point, or after its start before it has
one; :func:`overdue` keeps ``trials.progress_expires_at`` equal to it, so readers see it. A
resumed attempt's report of steps its trial had stored before it paused stores nothing
(``reporting.after_pause``) but is progress: it moves ``progress_expires_at`` itself, and the
later of the two deadlines holds.

Functions take the caller's session.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from hpo.service.db.models import MetricPoint, Study, Trial
from hpo.service.spec import StudySpec
from hpo.service.states import StudyState, TrialState
from hpo.service.storage.records import parse_spec

_LIVE_STUDIES = [StudyState.RUNNING.value, StudyState.PAUSED.value]


@dataclass(frozen=True)
class Overdue:
    """A running trial past a deadline, and which one (``progress`` or ``trial_timeout``)."""

    trial_id: int
    attempt: int
    deadline: str
    reason: str


def timed_studies(session: Session) -> list[tuple[int, StudySpec]]:
    """Running or paused studies whose spec sets a deadline of any kind."""
    rows = session.execute(select(Study.id, Study.spec).where(Study.state.in_(_LIVE_STUDIES)))
    out = []
    for study_id, raw in rows:
        budget = raw.get("budget") or {}
        if (
            raw.get("progress_timeout_s")
            or budget.get("trial_timeout_s")
            or budget.get("timeout_s")
        ):
            out.append((study_id, parse_spec(raw)))
    return out


def timed_out_studies(
    session: Session, studies: Sequence[tuple[int, StudySpec]], now: datetime
) -> list[int]:
    """Those of ``studies`` whose ``budget.timeout_s`` has passed since they started."""
    limits = {sid: spec.budget.timeout_s for sid, spec in studies if spec.budget.timeout_s}
    if not limits:
        return []
    rows = session.execute(select(Study.id, Study.started_at).where(Study.id.in_(limits)))
    return [
        sid
        for sid, started in rows
        if started is not None and now - started > timedelta(seconds=limits[sid])
    ]


def overdue(
    session: Session,
    studies: Sequence[tuple[int, StudySpec]],
    now: datetime,
    *,
    healthy_s: float = math.inf,
) -> list[Overdue]:
    """Running trials of ``studies`` past their trial timeout or progress deadline (and the
    progress deadline of the others brought up to date). A progress deadline counts only
    when the control plane has worked for ``healthy_s`` >= the study's ``progress_timeout_s``
    (a client cannot report progress to a frozen server or a database that is down)."""
    specs = dict(studies)
    rows = session.execute(
        select(
            Trial.id, Trial.study_id, Trial.attempts, Trial.started_at, Trial.progress_expires_at
        ).where(Trial.study_id.in_(specs), Trial.state == TrialState.RUNNING.value)
    ).all()
    out = []
    for trial_id, study_id, attempt, started, stored in rows:
        if started is None:
            continue
        spec = specs[study_id]
        limit = spec.budget.trial_timeout_s
        if limit and now - started > timedelta(seconds=limit):
            reason = f"the attempt ran longer than budget.trial_timeout_s = {limit:g} s"
            out.append(Overdue(trial_id, attempt, "trial_timeout", reason))
            continue
        if not spec.progress_timeout_s:
            continue
        deadline = _progress_deadline(session, trial_id, started, spec.progress_timeout_s)
        if stored is not None and stored > deadline:  # moved by a report that stored nothing
            deadline = stored
        if deadline != stored:
            session.execute(
                update(Trial)
                .where(Trial.id == trial_id, Trial.attempts == attempt)
                .values(progress_expires_at=deadline)
                .execution_options(synchronize_session=False)
            )
        if deadline < now and healthy_s >= spec.progress_timeout_s:
            reason = (
                f"no progress: no new metric point within progress_timeout_s = "
                f"{spec.progress_timeout_s:g} s (heartbeats alone do not count)"
            )
            out.append(Overdue(trial_id, attempt, "progress", reason))
    return out


def _progress_deadline(
    session: Session, trial_id: int, started: datetime, timeout_s: float
) -> datetime:
    newest = session.scalar(
        select(func.max(MetricPoint.time)).where(
            MetricPoint.trial_id == trial_id, MetricPoint.time >= started
        )
    )
    return max(started, newest or started) + timedelta(seconds=timeout_s)
