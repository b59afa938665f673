"""Study rows: lookup and locking, creation, paging, counts, the best trial(s).

Functions take the caller's session; the caller holds the transaction. A write to a study or
one of its trials locks the study's row first (``get(..., lock=True)``: ``SELECT ... FOR
UPDATE`` on PostgreSQL; SQLite write transactions are already exclusive) and then calls
:func:`touch`, so writes to one study are serialized and ``seq`` orders them.

Two cursors: ``seq`` moves with the structure (a study's or trial's state, values, params, spec,
placement...), ``curve_seq`` with every change, metric points included (``seq <= curve_seq``;
both take their numbers from one counter). Pages polling a study see 304 on its ``seq`` while
its trials stream; the curves follow ``curve_seq``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from hpo.service import analysis
from hpo.service.db.models import Study, Trial, utcnow
from hpo.service.errors import NameTaken, StudyNotFound
from hpo.service.records import ACTIVE_STATES, StudyRecord, TrialRecord
from hpo.service.spec import StudySpec
from hpo.service.states import NEW_STUDY_STATE, StudyState, TrialState
from hpo.service.storage import metrics
from hpo.service.storage.records import spec_of, study_record, trial_record

MAX_PAGE = 1000


def get(session: Session, study_id: int, *, lock: bool = False) -> Study:
    """The study, its row locked for writing when ``lock``. Raises StudyNotFound."""
    stmt = select(Study).where(Study.id == study_id)
    if lock and session.bind.dialect.name != "sqlite":
        stmt = stmt.with_for_update()
    study = session.scalars(stmt).one_or_none()
    if study is None:
        raise StudyNotFound(study_id)
    return study


def resolve(session: Session, ref: int | str) -> int:
    """The id of the study named by an id or a name. Raises StudyNotFound."""
    if isinstance(ref, int) or str(ref).isdigit():
        found = session.scalar(select(Study.id).where(Study.id == int(ref)))
    else:
        found = session.scalar(select(Study.id).where(Study.name == ref))
    if found is None:
        raise StudyNotFound(ref)
    return found


def seq(session: Session, study_id: int) -> int:
    """The study's change sequence (ETags and cursors rest on it). Raises StudyNotFound."""
    found = session.scalar(select(Study.seq).where(Study.id == study_id))
    if found is None:
        raise StudyNotFound(study_id)
    return found


def insert(session: Session, name: str, spec: dict[str, Any]) -> Study:
    """A new running study. Raises NameTaken when the name is taken (also when another
    writer took it a moment ago)."""
    taken = NameTaken(f"a study named {name!r} already exists", field="name")
    if session.scalar(select(Study.id).where(Study.name == name)) is not None:
        raise taken
    now = utcnow()
    study = Study(
        name=name,
        spec=spec,
        state=NEW_STUDY_STATE.value,
        next_number=0,
        seq=1,
        curve_seq=1,
        created_at=now,
        updated_at=now,
        started_at=now,
    )
    session.add(study)
    try:
        session.flush()
    except IntegrityError as exc:  # lost a race for the name
        raise taken from exc
    return study


def delete(session: Session, study: Study) -> None:
    """Delete the study with its trials, parameters, metric points and events. The points
    have no foreign key to cascade through (migration 0015): they go first, by study."""
    metrics.delete_of_study(session, study.id)
    session.delete(study)


def curve_seq(session: Session, study_id: int) -> int:
    """The study's curves cursor: it grows with every change, metric points included. Raises
    StudyNotFound."""
    found = session.scalar(select(Study.curve_seq).where(Study.id == study_id))
    if found is None:
        raise StudyNotFound(study_id)
    return found


def touch(study: Study, *trials: Trial, now: datetime | None = None) -> int:
    """Record a change of ``study`` (and ``trials``): bump both change sequences (a metric
    report, which changes only curves, calls :func:`touch_curves` instead). Returns the
    study's ``seq``."""
    study.seq = _next(study)
    study.curve_seq = study.seq
    study.updated_at = now or utcnow()
    for trial in trials:
        trial.seq = trial.curve_seq = study.seq
    return study.seq


def touch_curves(study: Study, *trials: Trial) -> int:
    """Record new metric points of ``trials``: bump only the curves' cursor (``curve_seq``).

    ``seq`` and ``updated_at`` stay: the study and its trial list did not change for a page
    that polls them. Returns the study's new ``curve_seq``.
    """
    study.curve_seq = _next(study)
    for trial in trials:
        trial.curve_seq = study.curve_seq
    return study.curve_seq


def _next(study: Study) -> int:
    """The next number of the study's one counter (``seq`` and ``curve_seq`` share it)."""
    return max(study.seq or 0, study.curve_seq or 0) + 1


def page(
    session: Session,
    *,
    state: str | None = None,
    limit: int = 50,
    cursor: int | None = None,
    name: str | None = None,
) -> tuple[list[Study], int | None]:
    """Studies newest first, at most ``limit``; and the id to continue below, if more."""
    limit = max(1, min(limit, MAX_PAGE))
    stmt = select(Study).order_by(Study.id.desc()).limit(limit + 1)
    if state:
        stmt = stmt.where(Study.state == str(state))
    if cursor is not None:
        stmt = stmt.where(Study.id < cursor)
    if name is not None:
        stmt = stmt.where(Study.name == name)
    studies = list(session.scalars(stmt))
    more = len(studies) > limit
    studies = studies[:limit]
    return studies, (studies[-1].id if more else None)


def in_states(session: Session, states: Sequence[StudyState]) -> list[tuple[int, str, dict]]:
    """(id, state, stored spec) of every study in one of ``states``, oldest first."""
    rows = session.execute(
        select(Study.id, Study.state, Study.spec)
        .where(Study.state.in_([s.value for s in states]))
        .order_by(Study.id)
    )
    return [(study_id, state, spec) for study_id, state, spec in rows]


def state_counts(session: Session, study_id: int) -> dict[str, int]:
    """How many trials of the study are in each state (states with none are absent)."""
    rows = session.execute(
        select(Trial.state, func.count()).where(Trial.study_id == study_id).group_by(Trial.state)
    )
    return {state: n for state, n in rows}


def count_active(session: Session, study_id: int) -> tuple[int, int]:
    """(running, waiting) trials of a study."""
    counts = state_counts(session, study_id)
    return counts.get(TrialState.RUNNING.value, 0), counts.get(TrialState.WAITING.value, 0)


def active_trial_ids(session: Session, study_id: int) -> list[int]:
    """Ids of the study's running and waiting trials."""
    return list(
        session.scalars(
            select(Trial.id).where(
                Trial.study_id == study_id, Trial.state.in_([s.value for s in ACTIVE_STATES])
            )
        )
    )


def record(session: Session, study: Study) -> StudyRecord:
    """The study as a record, with counts and best trial(s)."""
    best_trial, front = best(session, study)
    return study_record(study, state_counts(session, study.id), best_trial, front)


def best(session: Session, study: Study) -> tuple[TrialRecord | None, list[TrialRecord]]:
    """The best complete trial (single objective; ties go to the lower number), and the
    Pareto front in number order (multi-objective: the best trial is then None)."""
    spec = spec_of(study)
    base = (
        select(Trial)
        .where(Trial.study_id == study.id, Trial.state == TrialState.COMPLETE.value)
        .options(selectinload(Trial.params))
    )
    if spec.constraints:
        return _best_feasible(session, spec, base)
    if not spec.multi_objective:
        minimize = spec.objectives[0].direction == "minimize"
        order = Trial.value.asc() if minimize else Trial.value.desc()
        top = session.scalars(
            base.where(Trial.value.is_not(None)).order_by(order, Trial.number).limit(1)
        ).first()
        found = trial_record(top) if top else None
        return found, [found] if found else []
    trials = [t for t in session.scalars(base) if t.values]
    if not trials:
        return None, []
    signs = np.array([1.0 if o.direction == "minimize" else -1.0 for o in spec.objectives])
    front = analysis.pareto_front(np.array([t.values for t in trials], dtype=float) * signs)
    records = [trial_record(trials[i]) for i in front]
    return None, sorted(records, key=lambda r: r.number)


_FEASIBLE_PAGE = 200


def _best_feasible(
    session: Session, spec: StudySpec, base: Any
) -> tuple[TrialRecord | None, list[TrialRecord]]:
    """:func:`best` among the trials that satisfy the spec's constraints (as Optuna's
    ``best_trial`` does): None and an empty front while no complete trial is feasible."""
    if not spec.multi_objective:
        minimize = spec.objectives[0].direction == "minimize"
        order = Trial.value.asc() if minimize else Trial.value.desc()
        ranked = base.where(Trial.value.is_not(None)).order_by(order, Trial.number)
        offset = 0
        while page := list(session.scalars(ranked.offset(offset).limit(_FEASIBLE_PAGE))):
            found = next((t for t in feasible(session, spec, page)), None)
            if found is not None:
                return trial_record(found), [trial_record(found)]
            offset += len(page)
        return None, []
    trials = feasible(session, spec, [t for t in session.scalars(base) if t.values])
    if not trials:
        return None, []
    signs = np.array([1.0 if o.direction == "minimize" else -1.0 for o in spec.objectives])
    front = analysis.pareto_front(np.array([t.values for t in trials], dtype=float) * signs)
    return None, sorted((trial_record(trials[i]) for i in front), key=lambda r: r.number)


def feasible(session: Session, spec: StudySpec, trials: Sequence[Trial]) -> list[Trial]:
    """Those of ``trials`` (complete) whose told values and last reports meet every constraint."""
    last: dict[int, dict[str, float]] = {}
    ids = [t.id for t in trials]
    for name in spec.constraint_metrics:
        for trial_id, points in metrics.last_points(session, ids, name).items():
            last.setdefault(trial_id, {})[name] = next(iter(points.values()))
    out = []
    for t in trials:
        values = t.values if t.values is not None else [t.value]
        if all(v <= 0 for v in spec.violations(values, last.get(t.id, {}))):
            out.append(t)
    return out
