"""Trial rows: lookup and locking, creation, leases, paging, and trials as samplers see them.

Functions take the caller's session. A trial's state is written only through
:mod:`hpo.service.storage.transitions`; here it is only read, and set once at creation.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    String,
    bindparam,
    cast,
    func,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.orm import Session, selectinload

from hpo.service import attempts
from hpo.service.db.models import AskClaim, Study, Trial, TrialParam, UTCDateTime
from hpo.service.errors import TrialNotFound
from hpo.service.records import ACTIVE_STATES
from hpo.service.samplers.base import ObservedTrial
from hpo.service.states import NEW_TRIAL_STATE, StudyState, TrialState
from hpo.service.storage import events, metrics
from hpo.service.storage.studies import MAX_PAGE, touch

_ACTIVE = [s.value for s in ACTIVE_STATES]
_CHUNK = 500  # ids per IN (...) list: SQLite caps the variables of one statement


def get_trial(session: Session, trial_id: int, *, params: bool = True) -> Trial:
    """The trial with its parameters (loaded later, if ever, with ``params=False``: a metric
    report reads only the trial's row). Raises TrialNotFound."""
    stmt = select(Trial).where(Trial.id == trial_id)
    if params:
        stmt = stmt.options(selectinload(Trial.params))
    trial = session.scalars(stmt).one_or_none()
    if trial is None:
        raise TrialNotFound(trial_id)
    return trial


def lock(
    session: Session, trial_id: int, *, params: bool = True, key_share: bool = False
) -> tuple[Study, Trial]:
    """The trial (with its parameters unless ``params=False``) and its study, with the
    study's row locked for writing. ``key_share``: lock it ``FOR NO KEY UPDATE`` (PostgreSQL),
    which still serializes the study's writers but lets the foreign-key checks of other
    transactions' inserts (their ``FOR KEY SHARE``) pass. Raises TrialNotFound.

    On SQLite (the write transaction is already exclusive) one statement reads both rows;
    on PostgreSQL the trial is read by a statement of its own after the lock is granted, so
    it is the version the writer that held the lock left (not the one of the locking
    statement's snapshot)."""
    if session.bind.dialect.name == "sqlite":
        both = select(Study, Trial).join(Trial, Trial.study_id == Study.id)
        if params:
            both = both.options(selectinload(Trial.params))
        row = session.execute(both.where(Trial.id == trial_id)).one_or_none()
        if row is None:
            raise TrialNotFound(trial_id)
        return row[0], row[1]
    study_of = select(Trial.study_id).where(Trial.id == trial_id).scalar_subquery()
    stmt = select(Study).where(Study.id == study_of).with_for_update(key_share=key_share)
    study = session.scalars(stmt).one_or_none()
    if study is None:
        raise TrialNotFound(trial_id)
    return study, get_trial(session, trial_id, params=params)


# One statement (PostgreSQL): the study's row locked and its curves' cursor bumped, then the
# trial's row moved on, each checked as the lock finds it (a row changed by a transaction that
# committed while this one waited is read again and the conditions checked on it). The lease
# runs from when the rows were granted: the caller's clock, plus the statement's wait for them.
_NOTE_POINTS = text(
    """
    WITH study AS (
        UPDATE studies
        SET curve_seq = greatest(coalesce(seq, 0), coalesce(curve_seq, 0)) + 1
        WHERE id = :study_id AND state <> :stopped
          AND spec -> 'budget' ->> 'max_steps' IS NULL
          AND spec -> 'budget' ->> 'max_worker_seconds' IS NULL
        RETURNING curve_seq
    )
    UPDATE trials
    SET curve_seq = study.curve_seq,
        last_step = greatest(coalesce(trials.last_step, 0), :last_step),
        lease_expires_at = :lease_until + (clock_timestamp() - statement_timestamp())
    FROM study
    WHERE trials.id = :trial_id AND trials.state = :running AND trials.attempts = :attempts
      AND trials.attempt_token_hash IS NOT DISTINCT FROM :token_hash
    RETURNING trials.id
    """
).bindparams(
    bindparam("study_id", type_=BigInteger),
    bindparam("trial_id", type_=BigInteger),
    bindparam("last_step", type_=BigInteger),
    bindparam("attempts", type_=Integer),
    bindparam("token_hash", type_=String),
    bindparam("lease_until", type_=UTCDateTime),
)


def note_points(
    session: Session, trial: Trial, last_step: int, lease_s: float, now: datetime
) -> bool:
    """After a report stored ``trial``'s points (PostgreSQL): in one statement, lock its
    study's row and bump the curves' cursor (:func:`hpo.service.storage.studies.touch_curves`),
    move the trial's ``last_step`` up to ``last_step`` and renew its lease to ``now +
    lease_s`` plus the time the statement waited for the rows. Only while the study is not
    stopped and has no compute budget, and the trial still runs the attempt it ran when
    ``trial`` was read (same number, same token): returns whether it did. When it did not,
    the trial is untouched but the study's cursor may have been bumped: the caller rolls the
    transaction back. The study's row stays locked to the end of the transaction, which is
    one round trip away (its commit), where reading the rows and writing them back held it
    for four."""
    row = session.execute(
        _NOTE_POINTS,
        {
            "study_id": trial.study_id,
            "trial_id": trial.id,
            "stopped": StudyState.STOPPED.value,
            "running": TrialState.RUNNING.value,
            "attempts": trial.attempts,
            "token_hash": trial.attempt_token_hash,
            "last_step": last_step,
            "lease_until": now + timedelta(seconds=lease_s),
        },
    ).first()
    return row is not None


def with_study(session: Session, trial_id: int) -> tuple[Study, Trial]:
    """The trial (without its parameters) and its study, read in one statement and not
    locked. Raises TrialNotFound."""
    row = session.execute(
        select(Study, Trial).join(Trial, Trial.study_id == Study.id).where(Trial.id == trial_id)
    ).one_or_none()
    if row is None:
        raise TrialNotFound(trial_id)
    return row[0], row[1]


def first_waiting(session: Session, study_id: int) -> int | None:
    """The id of the study's lowest-numbered waiting trial, if any."""
    # The first entry of ix_trials_study_state_number for (study, waiting): without it,
    # SQLite walked the study's (study_id, number) key through every trial (migration 0014).
    return session.scalar(
        select(Trial.id)
        .where(Trial.study_id == study_id, Trial.state == TrialState.WAITING.value)
        .order_by(Trial.number)
        .limit(1)
    )


def insert(
    session: Session,
    study: Study,
    number: int,
    params: dict[str, Any],
    suggestion: dict[str, Any],
    *,
    lease_s: float,
    now: datetime,
    ask_key: str | None = None,
) -> Trial:
    """A new trial ``number`` of the locked ``study``, already claimed (running, attempt 1,
    leased for ``lease_s``; :func:`issue_token` gives it its token), with its first history
    line; ``ask_key`` is the Idempotency-Key of the ask that created it. The caller has
    checked ``number`` is the study's next one (compare-and-set); a clash (of the number or
    the key) raises IntegrityError at flush or commit."""
    trial = Trial(
        study_id=study.id,
        number=number,
        state=NEW_TRIAL_STATE.value,
        attempts=1,
        created_at=now,
        started_at=now,
        attempt_started_at=now if NEW_TRIAL_STATE == TrialState.RUNNING else None,
        lease_expires_at=now + timedelta(seconds=lease_s),
        suggestion=suggestion,
        ask_key=ask_key,
    )
    trial.params = [
        TrialParam(name=name, position=i, value=value)
        for i, (name, value) in enumerate(params.items())
    ]
    study.next_number = number + 1
    session.add(trial)
    touch(study, trial, now=now)
    session.flush()
    events.add(session, trial, NEW_TRIAL_STATE, "suggested by " + suggestion["sampler"])
    return trial


def by_ask_key(session: Session, study_id: int, key: str) -> tuple[int, int] | None:
    """The id of the study's trial that the ask with Idempotency-Key ``key`` created or
    claimed (waiting, or paused and promoted), and the attempt it claimed (1 when it created
    the trial); None when no ask of the study had that key."""
    claimed = session.execute(
        select(AskClaim.trial_id, AskClaim.attempt).where(
            AskClaim.study_id == study_id, AskClaim.key == key
        )
    ).one_or_none()
    if claimed is not None:
        return claimed[0], claimed[1]
    created = session.scalar(
        select(Trial.id).where(Trial.study_id == study_id, Trial.ask_key == key)
    )
    return None if created is None else (created, 1)


def note_claim(session: Session, trial: Trial, key: str) -> None:
    """Record that the ask with Idempotency-Key ``key`` claimed ``trial``'s current attempt.
    A key's earlier claim of the same trial is replaced (the ask sent again found it waiting
    and claimed it anew); the caller has checked, under the study's lock, that the key names
    no other trial."""
    row = session.get(AskClaim, (trial.study_id, key))
    if row is None:
        session.add(
            AskClaim(study_id=trial.study_id, key=key, trial_id=trial.id, attempt=trial.attempts)
        )
    else:
        row.trial_id, row.attempt = trial.id, trial.attempts


def credential(session: Session, trial_id: int) -> tuple[int, str | None] | None:
    """The trial's current attempt and its token's hash; None when there is no such trial."""
    row = session.execute(
        select(Trial.attempts, Trial.attempt_token_hash).where(Trial.id == trial_id)
    ).one_or_none()
    return None if row is None else (row[0], row[1])


def issue_token(trial: Trial) -> str:
    """A new token for the trial's current attempt (the trial has an id). Only its hash is
    stored, replacing the one before: the earlier token stops working."""
    token, trial.attempt_token_hash = attempts.new_token(trial.id, trial.attempts)
    return token


def renew_lease(trial: Trial, lease_s: float, now: datetime) -> None:
    """Extend the trial's lease to ``now + lease_s``."""
    trial.lease_expires_at = now + timedelta(seconds=lease_s)


def renew_leases(session: Session, trial_ids: Sequence[int], now: datetime) -> None:
    """Extend the leases of those of ``trial_ids`` that are running, each by its study's
    ``lease_s``. Locks no study row (the lease is not part of the change sequence)."""
    rows = session.execute(
        select(Trial.id, Study.spec)
        .join(Study, Study.id == Trial.study_id)
        .where(Trial.id.in_(trial_ids), Trial.state == TrialState.RUNNING.value)
    ).all()
    for trial_id, spec in rows:
        lease = float(spec.get("lease_s", 300))
        session.execute(
            update(Trial)
            .where(Trial.id == trial_id)
            .values(lease_expires_at=now + timedelta(seconds=lease))
        )


def expired(session: Session, now: datetime, *, study_id: int | None = None) -> list[int]:
    """Ids of running trials whose lease ended before ``now`` (of one study, or all)."""
    stmt = select(Trial.id).where(
        Trial.state == TrialState.RUNNING.value, Trial.lease_expires_at < now
    )
    if study_id is not None:
        stmt = stmt.where(Trial.study_id == study_id)
    return list(session.scalars(stmt))


def active(session: Session, study_ids: Sequence[int]) -> list[Trial]:
    """Running and waiting trials of these studies, with their parameters."""
    return list(
        session.scalars(
            select(Trial)
            .where(Trial.study_id.in_(study_ids), Trial.state.in_(_ACTIVE))
            .options(selectinload(Trial.params))
        )
    )


def steps_used(session: Session, study_id: int, *, besides: int | None = None) -> int:
    """Steps of training the study's trials have reported, summed (their ``last_step``, less
    the steps a PBT trial skipped by copying one further ahead), the trial ``besides`` left
    out."""
    where = [Trial.study_id == study_id]
    if besides is not None:
        where.append(Trial.id != besides)
    trained = func.coalesce(Trial.last_step, 0) - Trial.steps_copied
    # summed as floats: SQLite's integer sum raises on overflow, and steps go up to 2**62 (a
    # float is exact up to 2**53, far beyond any budget)
    summed = func.sum(cast(trained, Float))
    return int(session.scalar(select(func.coalesce(summed, 0.0)).where(*where)))


def worker_seconds_used(session: Session, study: Study, now: datetime) -> float:
    """Ranks x seconds the study's trials have used: their ended attempts' and what their
    running attempts have used so far."""
    from hpo.service.storage.transitions import attempt_seconds

    rows = session.scalars(
        select(Trial).where(
            Trial.study_id == study.id,
            or_(Trial.worker_seconds > 0, Trial.attempt_started_at.is_not(None)),
        )
    )
    return sum((t.worker_seconds or 0.0) + attempt_seconds(study, t, now) for t in rows)


def numbers(session: Session, trial_ids: Sequence[int]) -> dict[int, int]:
    """``{trial id: its number}``."""
    rows = session.execute(select(Trial.id, Trial.number).where(Trial.id.in_(list(trial_ids))))
    return {trial_id: number for trial_id, number in rows}


def numbered_params(
    session: Session, trial_ids: Collection[int]
) -> dict[int, tuple[int, dict[str, Any]]]:
    """``{trial id: (its number, its params)}``."""
    out: dict[int, tuple[int, dict[str, Any]]] = {}
    ids = list(trial_ids)
    for k in range(0, len(ids), _CHUNK):
        chunk = ids[k : k + _CHUNK]
        for trial_id, number in session.execute(
            select(Trial.id, Trial.number).where(Trial.id.in_(chunk))
        ):
            out[trial_id] = (number, {})
    for trial_id, name, value in _param_rows(session, ids):
        out[trial_id][1][name] = value
    return out


def _param_rows(session: Session, trial_ids: Sequence[int]) -> Iterator[tuple[int, str, Any]]:
    """``(trial id, name, value)`` of these trials' parameters, each trial's in position
    order, read ``_CHUNK`` trials at a time."""
    for k in range(0, len(trial_ids), _CHUNK):
        yield from session.execute(
            select(TrialParam.trial_id, TrialParam.name, TrialParam.value)
            .where(TrialParam.trial_id.in_(trial_ids[k : k + _CHUNK]))
            .order_by(TrialParam.trial_id, TrialParam.position)
        )


def pause_reasons(session: Session, trial_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """``{trial id: why it paused}`` (None-less: trials without a reason are left out)."""
    rows = session.execute(
        select(Trial.id, Trial.pause_reason).where(Trial.id.in_(list(trial_ids)))
    )
    return {trial_id: dict(reason) for trial_id, reason in rows if reason}


def paused(session: Session, study_id: int, *, settled_only: bool = False) -> dict[int, int]:
    """``{trial id: the step it paused at}`` of the study's paused trials (only those whose
    pausing attempt has ended, its last checkpoint recorded, when ``settled_only``: a
    scheduler owns the attempt until then). The step is the ranked metric's last step stored
    when it paused (``pause_reason["stored_to"]``), not the trial's ``last_step``: a
    trainable may stream other metrics on a finer axis (a loss per optimizer step beside
    validation per epoch), and the rung is the ranked metric's."""
    where = [Trial.study_id == study_id, Trial.state == TrialState.PAUSED.value]
    if settled_only:
        where.append(Trial.owner.is_(None))
    rows = session.execute(select(Trial.id, Trial.last_step, Trial.pause_reason).where(*where))
    return {trial_id: metrics.step_paused_at(last, reason) for trial_id, last, reason in rows}


def paused_trials(session: Session, study_ids: Sequence[int]) -> list[Trial]:
    """The paused trials of these studies."""
    return list(
        session.scalars(
            select(Trial).where(
                Trial.study_id.in_(study_ids), Trial.state == TrialState.PAUSED.value
            )
        )
    )


def states(session: Session, trial_ids: Sequence[int]) -> dict[int, TrialState]:
    """The state of each of ``trial_ids`` that still exists."""
    rows = session.execute(select(Trial.id, Trial.state).where(Trial.id.in_(trial_ids)))
    return {trial_id: TrialState(state) for trial_id, state in rows}


def page(
    session: Session,
    study_id: int,
    *,
    states: Sequence[str] | None = None,
    since: int | None = None,
    limit: int = MAX_PAGE,
    curves: bool = False,
) -> list[TrialRow]:
    """The study's trials changed after ``since`` (all when None), oldest change first; by
    ``curve_seq`` (metric points count as changes) when ``curves``, else by ``seq``.

    Read as columns, not ORM objects (a page of 1,000 trials and their parameters built
    5,000 mapped instances): each row has the trial's columns and its ``params``, and is
    read-only."""
    column = Trial.curve_seq if curves else Trial.seq
    stmt = (
        select(Trial.__table__)
        .where(Trial.study_id == study_id)
        .order_by(column, Trial.id)
        .limit(max(1, min(limit, MAX_PAGE)))
    )
    if since is not None:
        stmt = stmt.where(column > since)
    if states:
        stmt = stmt.where(Trial.state.in_([str(s) for s in states]))
    rows = session.execute(stmt).all()
    params: dict[int, list[_Param]] = {row.id: [] for row in rows}
    for trial_id, name, value in _param_rows(session, list(params)):
        params[trial_id].append(_Param(name, value))
    return [TrialRow(row, params[row.id]) for row in rows]


class Outcome(NamedTuple):
    """What the dashboard's analyses (importance, contours) read of a trial: no record."""

    id: int
    number: int
    state: str
    value: float | None
    values: list[float] | None
    seq: int
    params: dict[str, Any]


def outcomes(
    session: Session, study_id: int, since: int | None = None, limit: int = MAX_PAGE
) -> list[Outcome]:
    """The study's trials changed after ``since`` (by ``seq``: new metric points are no change
    here), oldest change first, at most ``limit``: six columns and the parameters."""
    stmt = (
        select(Trial.id, Trial.number, Trial.state, Trial.value, Trial.values, Trial.seq)
        .where(Trial.study_id == study_id)
        .order_by(Trial.seq, Trial.id)
        .limit(max(1, min(limit, MAX_PAGE)))
    )
    if since is not None:
        stmt = stmt.where(Trial.seq > since)
    rows = session.execute(stmt).all()
    params: dict[int, dict[str, Any]] = {row.id: {} for row in rows}
    for trial_id, name, value in _param_rows(session, list(params)):
        params[trial_id][name] = value
    return [Outcome(*row, params[row.id]) for row in rows]


class _Param(NamedTuple):
    name: str
    value: Any


class TrialRow:
    """A trial's row read as columns (by :func:`page`), with its parameters: what
    :func:`~hpo.service.storage.records.trial_record` reads of a trial. The columns are
    copied into the instance's attributes once (reading them through the row cost more than
    building the record, 26 reads per trial)."""

    def __init__(self, row: Any, params: list[_Param]) -> None:
        self.__dict__.update(row._mapping)
        self.params = params


class TrialChange(NamedTuple):
    """A trial as samplers see it, with its row id and the change sequence it was read at."""

    id: int
    seq: int
    trial: ObservedTrial


def observed_since(
    session: Session,
    study_id: int,
    pruned_metric: str,
    since: int | None = None,
    *,
    kept: bool = False,
    constraint_metrics: Sequence[str] = (),
) -> list[TrialChange]:
    """The study's trials changed after cursor ``since`` (every trial when None) and its
    active (running or waiting) ones, in number order, as samplers see them: pruned ones
    carry their last value of ``pruned_metric`` as their one intermediate value. With
    ``kept``, each carries what its sampler kept with its suggestion; finished ones carry
    their last value of each of ``constraint_metrics``.

    Read from columns in three queries whatever the count (no ORM row per trial), so a
    sampler's cache loads a whole study once and then only what changed.
    """
    where = [Trial.study_id == study_id]
    if since is not None:
        # Two index ranges, (study, seq > since) and (study, state), not an OR over the
        # study's every trial: flat in the study's size.
        changed = select(Trial.id).where(Trial.study_id == study_id, Trial.seq > since)
        active = select(Trial.id).where(Trial.study_id == study_id, Trial.state.in_(_ACTIVE))
        where = [Trial.id.in_(union_all(changed, active))]
    rows = session.execute(
        select(Trial.id, Trial.number, Trial.state, Trial.value, Trial.values, Trial.seq)
        .where(*where)
        .order_by(Trial.number)
    ).all()
    if not rows:
        return []
    params: dict[int, dict[str, Any]] = {row.id: {} for row in rows}
    for trial_id, name, value in session.execute(
        select(TrialParam.trial_id, TrialParam.name, TrialParam.value)
        .join(Trial, Trial.id == TrialParam.trial_id)
        .where(*where)
        .order_by(TrialParam.trial_id, TrialParam.position)
    ):
        # Not a trial created after the first query (PostgreSQL reads each statement afresh).
        if trial_id in params:
            params[trial_id][name] = value
    pruned = [row.id for row in rows if row.state == TrialState.PRUNED.value]
    last: dict[int, dict[int, float]] = {}
    for k in range(0, len(pruned), _CHUNK):
        last.update(metrics.last_points(session, pruned[k : k + _CHUNK], pruned_metric))
    kept_of = _kept(session, where) if kept else {}
    finished = [row.id for row in rows if row.state in _LEARNED]
    last_of = _last_values(session, finished, constraint_metrics)
    out = []
    for row in rows:
        if row.values is not None:
            values: tuple[float, ...] | None = tuple(row.values)
        else:
            values = None if row.value is None else (row.value,)
        trial = ObservedTrial(
            number=row.number,
            state=TrialState(row.state),
            params=params[row.id],
            values=values,
            intermediate=last.get(row.id, {}),
            metrics=last_of.get(row.id, {}),
            kept=kept_of.get(row.id, {}),
        )
        out.append(TrialChange(row.id, row.seq, trial))
    return out


_LEARNED = (TrialState.COMPLETE.value, TrialState.PRUNED.value)


def _kept(session: Session, where: list[Any]) -> dict[int, dict[str, Any]]:
    """``{trial id: what its sampler kept}`` (``suggestion["kept"]``) of the trials ``where``."""
    rows = session.execute(select(Trial.id, Trial.suggestion).where(*where))
    return {
        trial_id: dict(info["kept"])
        for trial_id, info in rows
        if isinstance(info, dict) and isinstance(info.get("kept"), dict)
    }


def _last_values(
    session: Session, trial_ids: Sequence[int], names: Sequence[str]
) -> dict[int, dict[str, float]]:
    """``{trial id: {metric: its last value}}`` of metrics ``names``."""
    out: dict[int, dict[str, float]] = {}
    for name in names:
        for k in range(0, len(trial_ids), _CHUNK):
            chunk = trial_ids[k : k + _CHUNK]
            for trial_id, points in metrics.last_points(session, chunk, name).items():
                out.setdefault(trial_id, {})[name] = next(iter(points.values()))
    return out


def observed(session: Session, study: Study, pruned_metric: str) -> list[ObservedTrial]:
    """Every trial of a study as samplers see it, in number order (see :func:`observed_since`)."""
    return [change.trial for change in observed_since(session, study.id, pruned_metric)]
