"""SQL access for the core: transactions, per-study locking, queries and row → record mapping.

Every write to a study or one of its trials happens in a transaction that first locks the
study's row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite transactions are already
exclusive) and bumps ``studies.seq``. Writes to one study are therefore serialized, and
``seq`` orders them: the ``since`` cursor and the ETag rest on it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, func, select
from sqlalchemy.orm import Session, selectinload

from hpo.service.db.models import MetricPoint, Study, Trial, TrialEvent, TrialParam, utcnow
from hpo.service.errors import StudyNotFound, TrialNotFound
from hpo.service.records import StudyRecord, TrialEventRecord, TrialRecord
from hpo.service.samplers.base import ObservedTrial


class Storage:
    """Owns the engine and hands out transactions."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._readonly = engine.execution_options(readonly=True)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A read-write transaction, committed on success and rolled back on error."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction that never blocks writers."""
        with Session(self._readonly, expire_on_commit=False) as session, session.begin():
            yield session


def get_study(session: Session, study_id: int, *, lock: bool = False) -> Study:
    stmt = select(Study).where(Study.id == study_id)
    if lock and session.bind.dialect.name != "sqlite":
        stmt = stmt.with_for_update()
    study = session.scalars(stmt).one_or_none()
    if study is None:
        raise StudyNotFound(study_id)
    return study


def get_trial(session: Session, trial_id: int) -> Trial:
    trial = session.scalars(
        select(Trial).where(Trial.id == trial_id).options(selectinload(Trial.params))
    ).one_or_none()
    if trial is None:
        raise TrialNotFound(trial_id)
    return trial


def lock_trial(session: Session, trial_id: int) -> tuple[Study, Trial]:
    """The trial and its study, with the study locked for writing."""
    study_id = session.scalar(select(Trial.study_id).where(Trial.id == trial_id))
    if study_id is None:
        raise TrialNotFound(trial_id)
    study = get_study(session, study_id, lock=True)
    return study, get_trial(session, trial_id)


def touch(study: Study, *trials: Trial, now: datetime | None = None) -> int:
    """Record a change of ``study`` (and ``trials``): bump the change sequence."""
    study.seq += 1
    study.updated_at = now or utcnow()
    for trial in trials:
        trial.seq = study.seq
    return study.seq


def add_event(session: Session, trial: Trial, state: str, detail: str | None = None) -> None:
    session.add(TrialEvent(trial_id=trial.id, state=state, attempt=trial.attempts, detail=detail))


def set_params(trial: Trial, params: dict[str, Any]) -> None:
    trial.params = [
        TrialParam(name=name, position=i, value=value)
        for i, (name, value) in enumerate(params.items())
    ]


def state_counts(session: Session, study_id: int) -> dict[str, int]:
    rows = session.execute(
        select(Trial.state, func.count()).where(Trial.study_id == study_id).group_by(Trial.state)
    )
    return {state: n for state, n in rows}


def count_active(session: Session, study_id: int) -> tuple[int, int]:
    """(running, waiting) trials of a study."""
    counts = state_counts(session, study_id)
    return counts.get("running", 0), counts.get("waiting", 0)


def observed_trials(session: Session, study: Study, pruned_metric: str) -> list[ObservedTrial]:
    """Every trial of a study as samplers see it; pruned ones carry their last watched value."""
    trials = session.scalars(
        select(Trial).where(Trial.study_id == study.id).options(selectinload(Trial.params))
    ).all()
    pruned_ids = [t.id for t in trials if t.state == "pruned"]
    last: dict[int, dict[int, float]] = {}
    if pruned_ids:
        newest = (
            select(MetricPoint.trial_id, func.max(MetricPoint.step).label("step"))
            .where(MetricPoint.trial_id.in_(pruned_ids), MetricPoint.name == pruned_metric)
            .group_by(MetricPoint.trial_id)
            .subquery()
        )
        rows = session.execute(
            select(MetricPoint.trial_id, MetricPoint.step, MetricPoint.value).join(
                newest,
                and_(
                    MetricPoint.trial_id == newest.c.trial_id,
                    MetricPoint.step == newest.c.step,
                    MetricPoint.name == pruned_metric,
                ),
            )
        )
        for trial_id, step, value in rows:
            last[trial_id] = {int(step): value}
    return [
        ObservedTrial(
            number=t.number,
            state=t.state,
            params={p.name: p.value for p in t.params},
            values=_values_of(t),
            intermediate=last.get(t.id, {}),
        )
        for t in trials
    ]


def _values_of(trial: Trial) -> tuple[float, ...] | None:
    if trial.values is not None:
        return tuple(trial.values)
    if trial.value is not None:
        return (trial.value,)
    return None


class SqlPruningHistory:
    """Answers a pruner's questions about the other trials of a study from ``metric_points``."""

    def __init__(self, session: Session, study_id: int, trial_id: int, metric: str) -> None:
        self.session, self.study_id, self.trial_id, self.metric = (
            session,
            study_id,
            trial_id,
            metric,
        )

    def values_at(self, step: int, *, complete_only: bool = False) -> list[float]:
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
                Trial.state == "complete"
            )
        return _first_per_trial(self.session, stmt)

    def n_complete(self) -> int:
        return self.session.scalar(
            select(func.count()).where(Trial.study_id == self.study_id, Trial.state == "complete")
        )


def _first_per_trial(session: Session, stmt: Any) -> list[float]:
    """One value per trial, even when a re-sent batch stored a step twice."""
    rows = session.execute(stmt.add_columns(MetricPoint.trial_id))
    seen: dict[int, float] = {}
    for value, trial_id in rows:
        seen.setdefault(trial_id, value)
    return list(seen.values())


def trial_record(trial: Trial, *, events: Sequence[TrialEvent] | None = None) -> TrialRecord:
    duration = None
    if trial.started_at is not None:
        end = trial.finished_at or utcnow()
        duration = (end - trial.started_at).total_seconds()
    placement = dict(trial.placement) if trial.placement else None
    if placement:
        placement.pop("handle", None)
    return TrialRecord(
        id=trial.id,
        study_id=trial.study_id,
        number=trial.number,
        state=trial.state,
        params={p.name: p.value for p in trial.params},
        value=trial.value,
        values=trial.values,
        attempts=trial.attempts,
        created_at=trial.created_at,
        started_at=trial.started_at,
        finished_at=trial.finished_at,
        duration_s=duration,
        lease_expires_at=trial.lease_expires_at,
        last_step=trial.last_step,
        error=trial.error,
        pruned=trial.pruned,
        suggestion=trial.suggestion,
        placement=placement,
        has_checkpoint=trial.checkpoint is not None,
        test_metrics=trial.test_metrics,
        seq=trial.seq,
        events=None
        if events is None
        else [
            TrialEventRecord(time=e.time, state=e.state, attempt=e.attempt, detail=e.detail)
            for e in events
        ],
    )


def study_record(
    study: Study,
    counts: dict[str, int],
    best: TrialRecord | None,
    front: list[TrialRecord],
) -> StudyRecord:
    spec = study.spec
    objectives = spec["objective"] if isinstance(spec["objective"], list) else [spec["objective"]]
    return StudyRecord(
        id=study.id,
        name=study.name,
        state=study.state,
        state_reason=study.state_reason,
        spec=spec,
        directions=[o["direction"] for o in objectives],
        created_at=study.created_at,
        updated_at=study.updated_at,
        started_at=study.started_at,
        finished_at=study.finished_at,
        n_trials=study.next_number,
        counts={
            s: counts.get(s, 0) for s in ("waiting", "running", "complete", "pruned", "failed")
        },
        best_trial=best,
        best_trials=front,
        seq=study.seq,
    )
