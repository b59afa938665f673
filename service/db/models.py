"""Tables: studies, trials, their parameters, metric points and state history."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from hpo.service.db import jsontext

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit key.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)  # PostgreSQL answers in the session's TimeZone


class ExactJSON(TypeDecorator):
    """JSON that keeps ``1.0`` a float on SQLite.

    SQLite gives a column declared JSON numeric affinity, which stores the text ``1.0`` as the
    integer 1; a TEXT column keeps the JSON text as written.
    """

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        return dialect.type_descriptor(Text() if dialect.name == "sqlite" else JSON())

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return json.dumps(value) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if dialect.name == "sqlite" and value is not None:
            return jsontext.loads(value)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        datetime: UTCDateTime,
    }


# SQLite would otherwise reuse the ids of deleted rows: an old trial id, ETag or cursor could
# then name a new study's data.
NO_REUSE = {"sqlite_autoincrement": True}


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = NO_REUSE

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    spec: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16), index=True)
    # Trial numbers handed out so far; the next trial gets this number (compare-and-set).
    next_number: Mapped[int] = mapped_column(Integer, default=0)
    # Bumped on every change of the study or one of its trials but their metric points (state,
    # values, parameters, spec...): the trials' `since` cursor and the study's ETag.
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    # Bumped on every change, metric points included (never below `seq`): the curves' cursor.
    curve_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    state_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    trials: Mapped[list[Trial]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True
    )


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("study_id", "number", name="uq_trials_study_number"),
        Index("uq_trials_study_ask_key", "study_id", "ask_key", unique=True),
        Index("ix_trials_study_seq", "study_id", "seq"),
        Index("ix_trials_study_curve_seq", "study_id", "curve_seq"),
        # (study, state) lookups, and the lowest-numbered trial in a state (the first waiting
        # one) from the index's first entry (migration 0014).
        Index("ix_trials_study_state_number", "study_id", "state", "number"),
        NO_REUSE,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    value: Mapped[float | None] = mapped_column(Float)
    values: Mapped[list[Any] | None]
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    # The study's `curve_seq` at the trial's last change, metric points included.
    curve_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    # Why the trial was pruned: rung/step, its value, the threshold it missed.
    pruned: Mapped[dict[str, Any] | None]
    # Why it was suggested: sampler, seed, observations used.
    suggestion: Mapped[dict[str, Any] | None]
    # Where it ran: Ray node, world size, device of every rank; executor handle.
    placement: Mapped[dict[str, Any] | None]
    checkpoint: Mapped[str | None] = mapped_column(Text)
    # Held-out test metrics, computed for the best trial once its study completes.
    test_metrics: Mapped[dict[str, Any] | None]
    # sha256 of the current attempt's token: only that attempt may write to the trial.
    attempt_token_hash: Mapped[str | None] = mapped_column(String(64))
    # Attempts lost to the infrastructure (restart, lost node): not counted against max_retries.
    infra_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The control plane (scheduler lease holder) that launched the running attempt.
    owner: Mapped[str | None] = mapped_column(String(128))
    # A running attempt must report a new step before this (the study's progress_timeout_s).
    progress_expires_at: Mapped[datetime | None]
    # The Idempotency-Key of the ask that created the trial: a repeated ask gets it back.
    ask_key: Mapped[str | None] = mapped_column(String(200))
    # Compute of its ended attempts (ranks x seconds), and when its running attempt began.
    worker_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    attempt_started_at: Mapped[datetime | None]
    # What the user attached to the trial (``set_user_attr``): a JSON object, None when empty.
    user_attrs: Mapped[dict[str, Any] | None]
    # Why a paused trial paused (the pruner's or PBT's reason: PBT names the trial to copy).
    pause_reason: Mapped[dict[str, Any] | None]
    # PBT: the trial's parameters over its steps, each segment with the trial it copied
    # ({"step", "params", "parent"}); None for a trial whose parameters never changed.
    schedule: Mapped[list[Any] | None]
    # PBT: steps it skipped by copying a trial further ahead (that trial trained them); its
    # ``budget.max_steps`` charge is ``last_step`` less these.
    steps_copied: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    study: Mapped[Study] = relationship(back_populates="trials")
    params: Mapped[list[TrialParam]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="TrialParam.position"
    )


class TrialParam(Base):
    __tablename__ = "trial_params"

    trial_id: Mapped[int] = mapped_column(
        ForeignKey("trials.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    value: Mapped[Any] = mapped_column(ExactJSON)


class MetricPoint(Base):
    __tablename__ = "metric_points"
    __table_args__ = (
        Index("ix_metric_points_trial_name_step", "trial_id", "name", "step"),
        Index("ix_metric_points_study_name_step", "study_id", "name", "step"),
        # Exactly once: a point re-sent by a retry (same attempt, name, step) is not stored again.
        Index(
            "uq_metric_points_trial_attempt_name_step",
            "trial_id",
            "attempt",
            "name",
            "step",
            unique=True,
        ),
        NO_REUSE,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # No foreign keys: on PostgreSQL each inserted point's check is a locking read of the
    # referenced row. The study's would share that row among every report of the study at
    # once, which PostgreSQL records as MultiXacts (migration 0013); the trial's cost a fifth
    # of PostgreSQL's CPU under 64 streaming trials (migration 0015). The trial's curves keep
    # their key, and deleting a study deletes its points (``storage.studies.delete``).
    trial_id: Mapped[int] = mapped_column(BigId)
    study_id: Mapped[int] = mapped_column(BigId)
    step: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)
    time: Mapped[datetime] = mapped_column(default=utcnow)
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class TrialCurve(Base):
    """One metric of one trial, downsampled at rest (:mod:`hpo.service.storage.curves`)."""

    __tablename__ = "trial_curves"

    trial_id: Mapped[int] = mapped_column(
        ForeignKey("trials.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    study_id: Mapped[int] = mapped_column(BigId, index=True)  # no foreign key: as in MetricPoint
    # Buckets are runs of 2**shift steps; n: steps seen; buckets: JSON list (see curves.py).
    shift: Mapped[int] = mapped_column(Integer, default=0)
    n: Mapped[int] = mapped_column(BigInteger, default=0)
    buckets: Mapped[str | None] = mapped_column(Text)


class TrialEvent(Base):
    """One line of a trial's history: a state change, a retry, a lease expiry."""

    __tablename__ = "trial_events"
    __table_args__ = (Index("ix_trial_events_trial", "trial_id", "id"), NO_REUSE)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"))
    time: Mapped[datetime] = mapped_column(default=utcnow)
    state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    detail: Mapped[str | None] = mapped_column(Text)


class Lease(Base):
    """A named lease (today: ``scheduler``): one holder at a time until ``expires_at``.

    ``epoch`` grows each time the lease changes hands, so a holder can tell that it lost it.
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    epoch: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime]


class Meta(Base):
    """Facts about the deployment this database belongs to, by key (``deployment_id``)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class StudyAnalysis(Base):
    """A dashboard analysis of a study (its importance, a contour) as last fitted, and the
    study's ``seq`` it was asked at: while the study's ``seq`` is still that, any server
    answers it without fitting again (:mod:`hpo.service.storage.analyses`)."""

    __tablename__ = "study_analyses"

    study_id: Mapped[int] = mapped_column(
        ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[str] = mapped_column(Text)
    stored_at: Mapped[datetime] = mapped_column(default=utcnow)


class AskClaim(Base):
    """An ask with an Idempotency-Key that claimed a trial already there (a waiting one, a
    promoted one) instead of creating one: the trial and the attempt it claimed, so that the
    ask sent again (its answer was lost) answers that attempt again. A key that created its
    trial is that trial's ``ask_key``."""

    __tablename__ = "ask_claims"

    study_id: Mapped[int] = mapped_column(
        ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    trial_id: Mapped[int] = mapped_column(BigId)  # no foreign key: a trial goes with its study
    attempt: Mapped[int] = mapped_column(Integer)
