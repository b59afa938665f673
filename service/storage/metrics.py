"""Metric points: storing a trial's reports, reading them back, and the pruner's questions.

Functions take the caller's session.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from itertools import groupby, islice
from operator import attrgetter, index, itemgetter
from typing import Any

from cachetools import LRUCache
from sqlalchemy import and_, bindparam, func, select, text
from sqlalchemy import delete as sa_delete
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from hpo.service.db.models import MetricPoint, Trial, utcnow
from hpo.service.records import MetricInput, MetricPointRecord, TrialMetricPoint
from hpo.service.states import FINISHED_TRIAL_STATES, TrialState
from hpo.service.storage import curves


def add(
    session: Session,
    trial: Trial,
    points: Sequence[MetricInput],
    now: datetime,
    *,
    ids: bool = True,
) -> list[int]:
    """Store ``points`` under the trial's current attempt, each at most once: a point that
    attempt already stored (same name and step, e.g. a batch sent again after its answer was
    lost) is left as it is (insert-or-ignore on UNIQUE(trial, attempt, name, step); of one
    step sent twice in a batch, the first value is stored). Returns the ids of the rows it
    inserted (not of those left as they were); with ``ids=False`` returns nothing.

    One statement whatever the batch: on PostgreSQL an ``INSERT ... SELECT FROM unnest(...)``
    of three arrays (one round trip, where an executemany sends one statement per point),
    on SQLite an executemany (a loop in C, no round trips).
    """
    if not points:
        return []
    curves.add(session, trial, points)  # the downsampled curves at rest
    if session.bind.dialect.name != "sqlite":
        return _add_postgresql(session, trial, points, now, ids=ids)
    table = MetricPoint.__table__
    if not ids:  # the usual case: one executemany of plain tuples, no per-row processing
        dialect = session.bind.dialect
        at = table.c.time.type.dialect_impl(dialect).bind_processor(dialect)(now)
        head = (trial.id, trial.study_id, trial.attempts)
        session.connection().exec_driver_sql(
            _SQLITE_INSERT, [(*head, p.step, p.name, float(p.value), at) for p in points]
        )
        return []
    rows = [
        {
            "trial_id": trial.id,
            "study_id": trial.study_id,
            "attempt": trial.attempts,
            "step": p.step,
            "name": p.name,
            "value": float(p.value),
            "time": now,
        }
        for p in points
    ]
    stmt = sqlite_insert(table).on_conflict_do_nothing().returning(table.c.id)
    return list(session.execute(stmt, rows).scalars())


_SQLITE_INSERT = (
    "INSERT INTO metric_points (trial_id, study_id, attempt, step, name, value, time) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)


_UNNEST_INSERT = """
INSERT INTO metric_points (trial_id, study_id, attempt, step, name, value, time)
SELECT :trial_id, :study_id, :attempt, u.step, u.name, u.value, :time
FROM unnest(CAST(:steps AS BIGINT[]), CAST(:names AS VARCHAR[]), CAST(:values AS FLOAT8[]))
    WITH ORDINALITY AS u(step, name, value, n)
ORDER BY u.n
ON CONFLICT DO NOTHING
"""


def _add_postgresql(
    session: Session, trial: Trial, points: Sequence[MetricInput], now: datetime, *, ids: bool
) -> list[int]:
    stmt = text(_UNNEST_INSERT + (" RETURNING id" if ids else "")).bindparams(
        bindparam("time", type_=MetricPoint.__table__.c.time.type)
    )
    result = session.execute(
        stmt,
        {
            "trial_id": trial.id,
            "study_id": trial.study_id,
            "attempt": trial.attempts,
            "time": now,
            **_array_literals(points),
        },
    )
    return list(result.scalars()) if ids else []


_STEP, _NAME, _VALUE = attrgetter("step"), attrgetter("name"), attrgetter("value")


def _array_literals(points: Sequence[MetricInput]) -> dict[str, str]:
    """The steps, names and values of ``points`` as PostgreSQL array literals, which the
    insert casts. Built by joins in C: psycopg dumps a Python list element by element in
    Python, an eighth of the server's time under 64 streaming trials. Each float is its
    ``repr``, which PostgreSQL reads back to the same double (``inf`` too); each
    name is quoted once per distinct name; a step that is not an integer raises TypeError
    (PostgreSQL would have rounded it)."""
    names = list(map(_NAME, points))
    quoted = {
        name: '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"' for name in set(names)
    }
    return {
        "steps": "{" + ",".join(map(str, map(index, map(_STEP, points)))) + "}",
        "names": "{" + ",".join(map(quoted.__getitem__, names)) + "}",
        "values": "{" + ",".join(map(repr, map(float, map(_VALUE, points)))) + "}",
    }


# Ids per DELETE: well under SQLite's limit of bound parameters in one statement.
_IDS_PER_DELETE = 500


def delete(session: Session, ids: Sequence[int]) -> None:
    """Delete the metric points with these ids (what :func:`add` returned)."""
    for i in range(0, len(ids), _IDS_PER_DELETE):
        chunk = list(ids[i : i + _IDS_PER_DELETE])
        session.execute(sa_delete(MetricPoint).where(MetricPoint.id.in_(chunk)))


def delete_of_study(session: Session, study_id: int) -> None:
    """Delete every metric point of the study (read through its ``study_id`` index)."""
    session.execute(sa_delete(MetricPoint).where(MetricPoint.study_id == study_id))


def take_back(session: Session, trial: Trial, ids: Sequence[int]) -> None:
    """Delete the points with these ids (what :func:`add` returned: the earlier commits of a
    batch refused later) and fold the trial's curves again from the points that stay."""
    delete(session, ids)
    curves.rebuild(session, [trial.id])


def stored_since(
    session: Session,
    trial_id: int,
    attempt: int,
    points: Sequence[MetricInput],
    ids: Collection[int],
) -> bool:
    """Whether every name and step of ``points`` has a point stored under the trial's
    ``attempt`` after the rows ``ids`` were (a greater id), other than those rows."""
    wanted = {(p.name, p.step) for p in points}
    steps = [step for _, step in wanted]
    rows = session.execute(
        select(MetricPoint.id, MetricPoint.name, MetricPoint.step).where(
            MetricPoint.trial_id == trial_id,
            MetricPoint.attempt == attempt,
            MetricPoint.id > min(ids),
            MetricPoint.name.in_({name for name, _ in wanted}),
            MetricPoint.step.between(min(steps), max(steps)),
        )
    )
    mine = set(ids)
    return wanted <= {(name, step) for id_, name, step in rows if id_ not in mine}


def max_step(session: Session, trial_id: int, name: str | None = None) -> int | None:
    """The trial's largest stored step of any attempt (of metric ``name``, else of any), if
    any."""
    stmt = select(func.max(MetricPoint.step)).where(MetricPoint.trial_id == trial_id)
    if name is not None:
        stmt = stmt.where(MetricPoint.name == name)
    return session.scalar(stmt)


def step_below(session: Session, trial_id: int, name: str, step: int) -> int | None:
    """The trial's largest stored step of metric ``name`` below ``step``, if any: one step
    read backwards from ``step`` in the (trial, name, step) index. Written as ``ORDER BY ...
    LIMIT 1``, not ``max()``: PostgreSQL turns ``max()`` into that only when it estimates it
    cheaper, and before the table's first ANALYZE (a new database filling up) it estimated one
    row and read every step of the trial below ``step`` (14 ms a report at 49,000 steps)."""
    return session.scalar(
        select(MetricPoint.step)
        .where(MetricPoint.trial_id == trial_id, MetricPoint.name == name, MetricPoint.step < step)
        .order_by(MetricPoint.step.desc())
        .limit(1)
    )


def steps_between(session: Session, trial_id: int, name: str, low: int, high: int) -> set[int]:
    """The trial's stored steps of metric ``name`` from ``low`` to ``high`` (inclusive)."""
    return set(
        session.scalars(
            select(MetricPoint.step)
            .where(
                MetricPoint.trial_id == trial_id,
                MetricPoint.name == name,
                MetricPoint.step.between(low, high),
            )
            .distinct()
        )
    )


def last_value(session: Session, trial_id: int, name: str) -> float | None:
    """The value at the trial's newest step of metric ``name``, if any."""
    return session.scalar(
        select(MetricPoint.value)
        .where(MetricPoint.trial_id == trial_id, MetricPoint.name == name)
        .order_by(MetricPoint.step.desc(), MetricPoint.attempt.desc(), MetricPoint.id.desc())
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
        select(MetricPoint.trial_id, MetricPoint.step, MetricPoint.value)
        .join(
            newest,
            and_(
                MetricPoint.trial_id == newest.c.trial_id,
                MetricPoint.step == newest.c.step,
                MetricPoint.name == name,
            ),
        )
        .order_by(MetricPoint.attempt)  # of a step stored by several attempts, the newest wins
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
    """The trial's points in step order (of metric ``name``; after ``since_step``), one per
    (name, step): the newest attempt's."""
    stmt = (
        select(
            MetricPoint.step,
            MetricPoint.name,
            MetricPoint.value,
            MetricPoint.time,
            MetricPoint.attempt,
        )
        .where(MetricPoint.trial_id == trial_id)
        .order_by(MetricPoint.step, MetricPoint.id)
    )
    if name is not None:
        stmt = stmt.where(MetricPoint.name == name)
    if since_step is not None:
        stmt = stmt.where(MetricPoint.step > since_step)
    rows = session.execute(stmt)
    newest = _newest_per_step(rows)
    return [
        MetricPointRecord(step=step, name=metric, value=value, time=time, attempt=attempt)
        for step, metric, value, time, attempt in islice(newest, max(0, limit))
    ]


def of_study(
    session: Session,
    study_id: int,
    *,
    name: str | None = None,
    after: int | None = None,
    limit: int = 100,
    max_points: int = 100_000,
) -> tuple[list[TrialMetricPoint], int | None]:
    """A page of the study's points (of metric ``name``), trial by trial in id order from the
    first trial whose id is above ``after``, each trial's as :func:`of_trial` gives them: at
    most ``limit`` trials, and no trial begun past ``max_points`` points (a page holds one
    trial at least). Returns the points and the cursor to pass as ``after`` for the next page
    (None once no trial is left)."""
    trials = session.execute(
        select(Trial.id, Trial.number)
        .where(Trial.study_id == study_id, Trial.id > (after if after is not None else -1))
        .order_by(Trial.id)
        .limit(limit)
    ).all()
    out: list[TrialMetricPoint] = []
    for start in range(0, len(trials), curves.IN_CHUNK):
        chunk = dict(trials[start : start + curves.IN_CHUNK])
        stmt = (
            select(
                MetricPoint.trial_id,
                MetricPoint.step,
                MetricPoint.name,
                MetricPoint.value,
                MetricPoint.time,
                MetricPoint.attempt,
            )
            .where(MetricPoint.trial_id.in_(list(chunk)))
            .order_by(MetricPoint.trial_id, MetricPoint.step, MetricPoint.id)
        )
        if name is not None:
            stmt = stmt.where(MetricPoint.name == name)
        # streamed (PostgreSQL: a server-side cursor), so a page cut at max_points leaves
        # the rest of the chunk unread
        result = session.execute(stmt.execution_options(yield_per=10_000))
        for trial_id, rows in groupby(result, key=itemgetter(0)):
            if out and len(out) >= max_points:
                return out, out[-1].trial_id  # this trial begins the next page
            out.extend(
                TrialMetricPoint(
                    trial_id=trial_id,
                    number=chunk[trial_id],
                    step=step,
                    name=metric,
                    value=value,
                    time=time,
                    attempt=attempt,
                )
                for step, metric, value, time, attempt in _newest_per_step(r[1:] for r in rows)
            )
    return out, (trials[-1][0] if len(trials) == limit else None)


def _newest_per_step(rows: Iterable[Any]) -> Iterator[Any]:
    """Of rows ``(step, name, ..., attempt)`` in step order, one per name and step: the newest
    attempt's, in the place of the first row of that name and step."""
    for _, same_step in groupby(rows, key=itemgetter(0)):
        chosen: dict[str, Any] = {}
        for row in same_step:
            held = chosen.get(row[1])
            if held is None or row[-1] > held[-1]:
                chosen[row[1]] = row
        yield from chosen.values()


# The complete trials' values of a metric at a step, per engine (by its connection pool, which
# the engine's read-only and impatient variants share): {(study id, metric, step, how many
# trials of the study were complete): {trial id: value}}. A complete trial takes no more points
# and stays complete, so the entry for a count of complete trials never goes stale, whichever
# server stored them: readers find it by the count they read from SQL.
_COMPLETE_AT: weakref.WeakKeyDictionary[Any, LRUCache] = weakref.WeakKeyDictionary()
_COMPLETE_AT_LOCK = threading.Lock()
# How many trials of a study were complete, by the study's ``seq`` when it was counted, per
# engine as above: {(study id, seq): count}. Every change of a trial's state bumps its study's
# ``seq`` in the same commit (``storage.transitions.set_trial_state``), so a reader of a seq
# finds the count as it was at some moment after the seq it read was committed: the count its
# own query could have seen, or a later one.
_N_COMPLETE: weakref.WeakKeyDictionary[Any, LRUCache] = weakref.WeakKeyDictionary()
_COMPLETE_AT_SIZE = 20_000


def _pool_cache(
    caches: weakref.WeakKeyDictionary[Any, LRUCache], session: Session, make: Callable[[], LRUCache]
) -> LRUCache:
    """The cache of ``caches`` that belongs to ``session``'s engine (its pool), made at first
    use (the caller holds the caches' lock)."""
    pool = session.get_bind().pool
    cache = caches.get(pool)
    if cache is None:
        cache = caches.setdefault(pool, make())
    return cache


class PruningHistory:
    """Answers a pruner's questions about the other trials of a study from ``metric_points``
    (the :class:`hpo.service.pruners.base.PruningHistory` a pruner reads). The complete
    trials' values at a step are kept in memory between reports (see ``_COMPLETE_AT``);
    ``steps``, the steps the pruner is about to judge, are loaded together at the first of
    them not in memory (two queries, where one a step would be a round trip each)."""

    def __init__(
        self,
        session: Session,
        study_id: int,
        trial_id: int,
        metric: str,
        *,
        study_seq: int | None = None,
        steps: Sequence[int] = (),
        reported: dict[int, float] | None = None,
        best_trial: Callable[[], int | None] | None = None,
    ) -> None:
        """``study_seq``: the study's ``seq`` as this transaction read it (its count of
        complete trials is then taken from memory when known for that seq); ``steps``: the
        steps the pruner is about to judge; ``reported``: the judged report's own values of
        the metric by step; ``best_trial``: the id of the study's best complete trial (None
        when there is none), asked only by a pruner that compares with it."""
        self.session = session
        self.study_id = study_id
        self.study_seq = study_seq
        self.trial_id = trial_id
        self.metric = metric
        self.reported = reported or {}
        self._best_trial = best_trial
        self.steps = sorted(set(steps))
        self._n_complete: int | None = None

    def values_at(
        self, step: int, *, complete_only: bool = False, bracket: tuple[int, int] | None = None
    ) -> list[float]:
        """Each other trial's value of the metric at its first step at or after ``step`` (of
        the trials whose ``number % n == b`` only, when ``bracket`` is (n, b))."""
        if complete_only and bracket is None:
            return [v for t, v in self._complete_at(step).items() if t != self.trial_id]
        found = values_at_by_trial(self.session, self.study_id, self.metric, step, bracket)
        return [v for t, v in found.items() if t != self.trial_id]

    def values_by_trial_at(self, step: int) -> dict[int, float]:
        """``{trial id: value}`` of each other trial at its first step at or after ``step``."""
        found = values_at_by_trial(self.session, self.study_id, self.metric, step)
        return {t: v for t, v in found.items() if t != self.trial_id}

    def waiting_behind(self, step: int, population: int, grace_s: float = 0.0) -> int:
        """Trials of the study paused at a step below ``step`` for more than ``grace_s``,
        plus those of ``population`` not created yet when no trial was created for that long
        (sooner, a free slot is about to take them: they are not waiting for one)."""
        now = utcnow()
        paused = self.session.execute(
            select(Trial.last_step, Trial.pause_reason).where(
                Trial.study_id == self.study_id, Trial.state == TrialState.PAUSED.value
            )
        )
        waiting = sum(
            1
            for last, reason in paused
            if step_paused_at(last, reason) < step and _waited(reason, now, grace_s)
        )
        created, last = self.session.execute(
            select(func.count(), func.max(Trial.created_at)).where(Trial.study_id == self.study_id)
        ).one()
        if created < population and (last is None or (now - last).total_seconds() > grace_s):
            waiting += population - created
        return waiting

    def n_complete(self) -> int:
        """How many trials of the study are complete (read once per history, and not at all
        when it was read for the study's ``seq`` before: see ``_N_COMPLETE``)."""
        if self._n_complete is not None:
            return self._n_complete
        key = (self.study_id, self.study_seq)
        with _COMPLETE_AT_LOCK:
            cache = _pool_cache(_N_COMPLETE, self.session, lambda: LRUCache(maxsize=10_000))
            known = cache.get(key) if self.study_seq is not None else None
        if known is None:
            known = self.session.scalar(
                select(func.count()).where(
                    Trial.study_id == self.study_id, Trial.state == TrialState.COMPLETE.value
                )
            )
            if self.study_seq is not None:
                with _COMPLETE_AT_LOCK:
                    cache[key] = known
        self._n_complete = known
        return known

    def _complete_at(self, step: int) -> dict[int, float]:
        """``{complete trial id: value at its first step >= step}``, from memory when the
        count of complete trials is the one cached, else loaded (with the steps of
        ``self.steps`` above it that are not in memory either)."""
        key = (self.study_id, self.metric, step, self.n_complete())
        with _COMPLETE_AT_LOCK:
            cache = _pool_cache(
                _COMPLETE_AT, self.session, lambda: LRUCache(maxsize=_COMPLETE_AT_SIZE)
            )
            found = cache.get(key)
            if found is not None:
                return found
            missing = [s for s in self.steps if s > step and (*key[:2], s, key[3]) not in cache]
        n, loaded = self._load_complete_at([step, *missing])
        with _COMPLETE_AT_LOCK:
            for at, values in loaded.items():
                cache[(*key[:2], at, n)] = values
        return loaded[step]

    def _load_complete_at(self, steps: list[int]) -> tuple[int, dict[int, dict[int, float]]]:
        """The count of complete trials the queries saw (the cache's key) and their values at
        each of ``steps`` (ascending), ``{step: {trial id: value}}``: one index lookup per trial
        at the last step (never a scan of every point of the study above it), and the points
        between the first and the last step."""
        last = steps[-1]
        first = first_value_at(self.metric, last)
        rows = self.session.execute(
            select(Trial.id, first).where(
                Trial.study_id == self.study_id, Trial.state == TrialState.COMPLETE.value
            )
        ).all()
        # Keyed by the count this query saw (a trial may have completed since n_complete).
        n = len(rows)
        at_last = {trial_id: value for trial_id, value in rows if value is not None}
        out = {last: at_last}
        if len(steps) == 1:
            return n, out
        curves: dict[int, tuple[list[int], list[float]]] = {t: ([], []) for t, _ in rows}
        between = self.session.execute(
            select(MetricPoint.trial_id, MetricPoint.step, MetricPoint.value)
            .join(Trial, Trial.id == MetricPoint.trial_id)
            .where(
                Trial.study_id == self.study_id,
                Trial.state == TrialState.COMPLETE.value,
                MetricPoint.name == self.metric,
                MetricPoint.step.between(steps[0], last - 1),
            )
            .order_by(MetricPoint.trial_id, MetricPoint.step, MetricPoint.attempt.desc())
        )
        for trial_id, at, value in between:
            curve = curves.get(trial_id)  # None: completed after the first query
            if curve is not None and (not curve[0] or curve[0][-1] != at):
                curve[0].append(at)  # of a step stored by several attempts, the newest
                curve[1].append(value)
        for step in steps[:-1]:
            values = {}
            for trial_id, (at, value) in curves.items():
                i = bisect_left(at, step)
                if i < len(at):
                    values[trial_id] = value[i]
                elif trial_id in at_last:
                    values[trial_id] = at_last[trial_id]
            out[step] = values
        return n, out

    def trial_values(self) -> dict[int, float]:
        """The trial's values of the metric by step: stored (newest attempt's) and reported."""
        stored = {p.step: p.value for p in of_trial(self.session, self.trial_id, name=self.metric)}
        return {**stored, **{s: v for s, v in self.reported.items() if s not in stored}}

    def best_trial_values(self) -> dict[int, float]:
        """The metric by step of the study's best complete trial; empty when there is none."""
        best = self._best_trial() if self._best_trial is not None else None
        if best is None:
            return {}
        return {p.step: p.value for p in of_trial(self.session, best, name=self.metric)}


def pause_step(reason: Mapping[str, Any] | None) -> int | None:
    """The step a paused trial paused at, as its pause reason records it: the last step of
    the ranked metric stored then (``stored_to``), or, in a reason recorded before that was,
    the step its pruner judged (``step``); None when it records neither. Not the trial's
    ``last_step``: a trainable may stream other metrics on a finer axis (a loss per optimizer
    step beside validation per epoch), and rungs and PBT boundaries are the ranked metric's."""
    if not reason:
        return None
    return reason.get("stored_to", reason.get("step"))


def step_paused_at(last_step: int | None, reason: Mapping[str, Any] | None) -> int:
    """:func:`pause_step`, else the trial's ``last_step`` (0 for none)."""
    step = pause_step(reason)
    return (last_step or 0) if step is None else step


def _waited(reason: dict[str, Any] | None, now: datetime, grace_s: float) -> bool:
    """Whether a trial paused with ``reason`` (its ``paused_at``) has waited past grace."""
    at = (reason or {}).get("paused_at")
    return at is None or (now - datetime.fromisoformat(at)).total_seconds() > grace_s


def first_value_at(metric: str, step: int) -> Any:
    """A scalar subquery, correlated to ``Trial``: the trial's value of ``metric`` at its first
    step at or after ``step`` (of a step several attempts reported, the newest attempt's), or
    NULL. It reads the trial's (trial, name, step) index from ``step`` and stops at the first
    step there: both databases sort only that step's rows by attempt (SQLite's "temp b-tree
    for right part of order by"; PostgreSQL's incremental sort, once it has statistics of the
    table: before its first ANALYZE it may sort all of the trial's points above ``step``)."""
    return (
        select(MetricPoint.value)
        .where(
            MetricPoint.trial_id == Trial.id,
            MetricPoint.name == metric,
            MetricPoint.step >= step,
        )
        .order_by(MetricPoint.step, MetricPoint.attempt.desc())
        .limit(1)
        .correlate(Trial)
        .scalar_subquery()
    )


# A finished trial's values at a rung, kept per engine: {(study id, metric, step, bracket):
# {trial id: (its attempts, its value there or None)}}. A finished trial (complete, pruned,
# failed: no state leads out of them) takes no more points, so its value at a step stays,
# once it finished RUNG_VALUES_SETTLED_S ago: until then a report of over POINTS_PER_COMMIT
# points that was under way when it finished may still take its earlier commits back
# (reporting._take_back), and the finish itself may be a write not committed yet (a write
# transaction that asks, then rolls back). The attempts kept are checked against the trial's.
# Sized by the trials kept in all entries together.
_RUNG_VALUES: weakref.WeakKeyDictionary[Any, LRUCache] = weakref.WeakKeyDictionary()
_RUNG_VALUES_LOCK = threading.Lock()
_RUNG_VALUES_SIZE = 200_000
RUNG_VALUES_SETTLED_S = 600.0
_FINISHED = frozenset(state.value for state in FINISHED_TRIAL_STATES)


def _pruned_below(state: str, reason: Any, step: int) -> bool:
    """Whether a trial was pruned at a step below ``step``: it never passed that rung, though
    points of the batch that crossed it were stored (ranked there, it pushed the rung's one
    survivor out)."""
    if state != TrialState.PRUNED.value or not isinstance(reason, dict):
        return False
    at = reason.get("step")
    return isinstance(at, int) and at < step


def values_at_by_trial(
    session: Session,
    study_id: int,
    metric: str,
    step: int,
    bracket: tuple[int, int] | None = None,
) -> dict[int, float]:
    """``{trial id: its value of metric at its first step >= step}`` for every trial of the
    study that reached ``step`` (of a step several attempts reported, the newest attempt's);
    with ``bracket`` (n, b), only the trials whose ``number % n == b``. Reads the study's
    trials (id, attempts, state), takes the values of those finished long enough ago from
    memory where they were looked up before (see ``_RUNG_VALUES``), and looks the others up
    trial by trial (see :func:`first_value_at`): never a scan of the study's points above
    ``step`` (ASHA asks at its lowest rung, where that is nearly every point of the study)."""
    where = [Trial.study_id == study_id]
    if bracket is not None:
        n, b = bracket
        where.append(Trial.number % n == b)
    settled = Trial.finished_at < utcnow() - timedelta(seconds=RUNG_VALUES_SETTLED_S)
    trials = session.execute(
        select(Trial.id, Trial.attempts, Trial.state.in_(_FINISHED) & settled).where(*where)
    ).all()
    key = (study_id, metric, step, bracket)
    with _RUNG_VALUES_LOCK:
        cache = _pool_cache(
            _RUNG_VALUES, session, lambda: LRUCache(_RUNG_VALUES_SIZE, getsizeof=len)
        )
        known: dict[int, tuple[int, float | None]] = cache.get(key) or {}
    out: dict[int, float] = {}
    todo: dict[int, int | None] = {}  # trial id: its attempts when settled, else None
    for trial_id, attempts, finished in trials:
        hit = known.get(trial_id) if finished else None
        if hit is not None and hit[0] == attempts:
            if hit[1] is not None:
                out[trial_id] = hit[1]
        else:
            todo[trial_id] = attempts if finished else None
    if not todo:
        return out
    found: dict[int, float] = {}
    ids = list(todo)
    for i in range(0, len(ids), 500):  # under SQLite's limit of bound parameters
        chunk = ids[i : i + 500]
        rows = session.execute(
            select(Trial.id, first_value_at(metric, step), Trial.state, Trial.pruned).where(
                Trial.id.in_(chunk)
            )
        )
        found.update(
            (trial_id, value)
            for trial_id, value, state, pruned in rows
            if value is not None and not _pruned_below(state, pruned, step)
        )
    out.update(found)
    fresh = {t: (a, found.get(t)) for t, a in todo.items() if a is not None}
    if fresh:
        with _RUNG_VALUES_LOCK:  # a new dict, so the cache counts the trials it holds
            kept = {**(cache.get(key) or {}), **fresh}
            if len(kept) <= cache.maxsize:
                cache[key] = kept
    return out
