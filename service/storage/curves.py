"""Learning curves at rest: each trial's metric, downsampled as its points are stored.

A study's overview of curves used to read every stored point of every trial (ten million rows
at 10,000 trials × 1,000 steps). Here each (trial, metric) keeps one ``trial_curves`` row of
at most :data:`BUCKETS` buckets of steps, each bucket the first, last, lowest and highest
point it has seen and how many steps fell in it, so an overview costs O(trials × BUCKETS)
whatever the number of points, and no extremum is ever lost.

Buckets are runs of ``2**shift`` steps (bucket ``step >> shift``); when a step falls past the
last bucket, ``shift`` grows and neighbouring buckets merge. A bucket of at most four steps
keeps them all, so a curve of up to ~``2 * BUCKETS`` steps is exact. :func:`add` folds each
batch of points into the rows (called when points are stored); :func:`rebuild` makes them
from the stored points (the migration's back-fill, and bulk loads that bypass :func:`add`).

What is approximate: a step stored again with another value (a later attempt) replaces the
first/last point of its bucket but not an extremum it set; ``n`` counts a step once unless it
arrives out of order inside its bucket's span (a re-sent batch is never counted twice). The
points of a batch refused after its first commits are deleted again and the trial's curves
rebuilt (``reporting.report``). The full-resolution series stays in ``metric_points``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from itertools import groupby
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import bindparam, case, exists, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from hpo.service.db import jsontext
from hpo.service.db.models import MetricPoint, Trial, TrialCurve
from hpo.service.records import MetricInput
from hpo.service.states import FINISHED_TRIAL_STATES, TrialState

# Buckets per curve: at most 4 points each, so at most 120 points (the dashboard's overview).
BUCKETS = 30

# A bucket: [first step, first value, last step, last value, min step, min value, max step,
# max value, steps seen], stored as [bucket index, *bucket].
Bucket = list[Any]

IN_CHUNK = 500  # trial ids per IN (...): under SQLite's limit of bound parameters


def shift_for(step: int) -> int:
    """The smallest shift that puts ``step`` in one of the BUCKETS buckets."""
    shift = 0
    while (max(step, 0) >> shift) >= BUCKETS:
        shift += 1
    return shift


def _fold(bucket: Bucket, step: int, value: float) -> None:
    """Fold one point into a bucket (see the module's notes on what stays approximate)."""
    if step < bucket[0]:
        bucket[0:2] = step, value
        bucket[8] += 1
    elif step > bucket[2]:
        bucket[2:4] = step, value
        bucket[8] += 1
    elif step == bucket[0]:
        bucket[1] = value
    elif step == bucket[2]:
        bucket[3] = value
    if value < bucket[5]:
        bucket[4:6] = step, value
    if value > bucket[7]:
        bucket[6:8] = step, value


def _merge(into: Bucket, other: Bucket) -> None:
    """Fold bucket ``other`` (steps after or before ``into``'s) into ``into``."""
    if other[0] < into[0]:
        into[0:2] = other[0:2]
    if other[2] > into[2]:
        into[2:4] = other[2:4]
    if other[5] < into[5]:
        into[4:6] = other[4:6]
    if other[7] > into[7]:
        into[6:8] = other[6:8]
    into[8] += other[8]


class Curve:
    """One trial's metric at rest: ``shift`` and its buckets by index."""

    def __init__(self, shift: int = 0, buckets: dict[int, Bucket] | None = None) -> None:
        self.shift = shift
        self.buckets = buckets if buckets is not None else {}

    @classmethod
    def loads(cls, shift: int, text: str) -> Curve:
        return cls(shift, {row[0]: row[1:] for row in jsontext.loads_small_ints(text)})

    def dumps(self) -> str:
        return json.dumps([[i, *self.buckets[i]] for i in sorted(self.buckets)])

    def add(self, step: int, value: float) -> None:
        """Fold one point in, coarsening the buckets first when ``step`` lies past them."""
        if (max(step, 0) >> self.shift) >= BUCKETS:
            self.coarsen(shift_for(step))
        i = max(step, 0) >> self.shift
        bucket = self.buckets.get(i)
        if bucket is None:
            self.buckets[i] = [step, value, step, value, step, value, step, value, 1]
        else:
            _fold(bucket, step, value)

    def coarsen(self, shift: int) -> None:
        """Merge the buckets into runs of ``2**shift`` steps."""
        merged: dict[int, Bucket] = {}
        for i in sorted(self.buckets):
            j = i >> (shift - self.shift)
            if j in merged:
                _merge(merged[j], self.buckets[i])
            else:
                merged[j] = list(self.buckets[i])
        self.shift, self.buckets = shift, merged

    def n(self) -> int:
        """Steps seen (see the module's notes)."""
        return sum(b[8] for b in self.buckets.values())

    def points(self) -> tuple[list[int], list[float]]:
        """The kept points in step order: each bucket's first, lowest, highest and last."""
        return _kept_points([i, *self.buckets[i]] for i in sorted(self.buckets))


class Kept(NamedTuple):
    """A curve as the dashboard's overview sends it: its kept points in step order
    (:meth:`Curve.points`) and the steps seen (:meth:`Curve.n`)."""

    steps: list[int]
    values: list[float]
    n: int


def _kept_points(rows: Iterable[Sequence]) -> tuple[list[int], list[float]]:
    """The kept points of stored rows ``[index, *bucket]`` in index order."""
    kept: dict[int, float] = {}
    for _, f, fv, last, lv, lo, lov, hi, hiv, _n in rows:
        if lo > hi:
            lo, lov, hi, hiv = hi, hiv, lo, lov
        kept[f] = fv  # first <= lowest/highest <= last within a bucket
        kept[lo] = lov
        kept[hi] = hiv
        kept[last] = lv
    return list(kept), list(kept.values())


def from_points(steps: Sequence[int], values: Sequence[float]) -> Curve:
    """The curve of a whole series (steps ascending, one value each), built in numpy."""
    s = np.asarray(steps, dtype=np.int64)
    v = np.asarray(values, dtype=float)
    if not len(s):
        return Curve()
    shift = shift_for(int(s[-1]))
    b = np.maximum(s, 0) >> shift
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    ends = np.r_[starts[1:], len(s)] - 1
    order = np.lexsort((v, b))  # by bucket, then by value: the same runs, sorted
    lows, highs = order[starts], order[ends]
    buckets = {}
    for k, i in enumerate(b[starts].tolist()):
        f, last, lo, hi = int(starts[k]), int(ends[k]), int(lows[k]), int(highs[k])
        buckets[i] = [
            int(s[f]), float(v[f]), int(s[last]), float(v[last]),
            int(s[lo]), float(v[lo]), int(s[hi]), float(v[hi]), last - f + 1,
        ]  # fmt: skip
    return Curve(shift, buckets)


# --------------------------------------------------------------------------- writing


def add(session: Session, trial: Trial, points: Sequence[MetricInput]) -> None:
    """Fold a batch of the trial's points into its curves (in the caller's transaction).

    Each (trial, metric) row is read ``FOR UPDATE`` on PostgreSQL (SQLite's write transaction
    already excludes other writers), so concurrent batches of one trial do not lose points;
    a metric's row is made (insert-or-ignore) by the first batch that brings it.
    """
    if not points:
        return
    by_name: dict[str, list[MetricInput]] = {}
    for p in points:
        by_name.setdefault(p.name, []).append(p)
    table = TrialCurve.__table__
    rows = _locked(session, trial, list(by_name))
    missing = set(by_name).difference(name for name, _, _ in rows)
    if missing:  # a trial's first points of a metric: make its row, then lock it too
        insert = sqlite_insert if session.bind.dialect.name == "sqlite" else postgresql_insert
        empty = [
            {"trial_id": trial.id, "study_id": trial.study_id, "name": name, "shift": 0, "n": 0}
            for name in sorted(missing)
        ]
        session.execute(insert(table).on_conflict_do_nothing(), empty)
        rows += _locked(session, trial, sorted(missing))
    changed = []
    for name, shift, text in rows:
        curve = Curve.loads(shift, text) if text else Curve()
        for p in sorted(by_name[name], key=lambda p: p.step):
            curve.add(p.step, float(p.value))
        changed.append(
            {"t": trial.id, "m": name, "shift": curve.shift, "n": curve.n(), "b": curve.dumps()}
        )
    session.execute(
        update(table)
        .where(table.c.trial_id == _param("t"), table.c.name == _param("m"))
        .values(shift=_param("shift"), n=_param("n"), buckets=_param("b")),
        changed,
        execution_options={"synchronize_session": False},
    )


def _locked(session: Session, trial: Trial, names: list[str]) -> list[Any]:
    """The trial's curve rows of these metrics, ``(name, shift, buckets)``, locked."""
    table = TrialCurve.__table__
    return list(
        session.execute(
            select(table.c.name, table.c.shift, table.c.buckets)
            .where(table.c.trial_id == trial.id, table.c.name.in_(names))
            .with_for_update()
        ).all()
    )


def _param(name: str) -> Any:
    return bindparam(name)


def rebuild(bind: Session | Connection, trial_ids: Iterable[int] | None = None) -> int:
    """(Re)make the curves of these trials (of every trial when None) from their stored
    points, the newest attempt's value at each step. Returns the number of curves written."""
    table = TrialCurve.__table__
    ids = list(trial_ids) if trial_ids is not None else None
    if ids is None:
        bind.execute(table.delete())
        chunks: list[list[int] | None] = [None]
    else:
        chunks = [ids[k : k + IN_CHUNK] for k in range(0, len(ids), IN_CHUNK)]
    written = 0
    for chunk in chunks:
        if chunk is not None:
            bind.execute(table.delete().where(table.c.trial_id.in_(chunk)))
        written += _rebuild_chunk(bind, chunk)
    return written


def _rebuild_chunk(bind: Session | Connection, chunk: list[int] | None) -> int:
    mp = MetricPoint.__table__
    stmt = select(mp.c.trial_id, mp.c.study_id, mp.c.name, mp.c.step, mp.c.value).order_by(
        mp.c.trial_id, mp.c.name, mp.c.step, mp.c.attempt
    )
    if chunk is not None:
        stmt = stmt.where(mp.c.trial_id.in_(chunk))
    rows: list[dict[str, Any]] = []
    written = 0
    result = bind.execute(stmt.execution_options(yield_per=100_000))
    for (trial_id, study_id, name), points in groupby(result, key=lambda r: r[:3]):
        by_step: dict[int, float] = {}
        for row in points:
            by_step[row[3]] = row[4]  # attempts ascending: the newest wins
        curve = from_points(list(by_step), list(by_step.values()))
        rows.append(
            {
                "trial_id": trial_id,
                "study_id": study_id,
                "name": name,
                "shift": curve.shift,
                "n": curve.n(),
                "buckets": curve.dumps(),
            }
        )
        if len(rows) >= 5_000:
            written += _insert(bind, rows)
    return written + _insert(bind, rows)


def _insert(bind: Session | Connection, rows: list[dict[str, Any]]) -> int:
    if rows:
        bind.execute(TrialCurve.__table__.insert(), rows)
    n = len(rows)
    rows.clear()
    return n


# --------------------------------------------------------------------------- reading


class CurveRow(NamedTuple):
    """A trial as the overview of curves shows it (no parameters, no record)."""

    id: int
    number: int
    state: str
    last_step: int | None
    curve_seq: int


def changed(session: Session, study_id: int, since: int | None, limit: int) -> list[CurveRow]:
    """The study's trials whose curves cursor is past ``since`` (all when None), oldest change
    first, at most ``limit``: the order of ``Storage.list_trials``, in columns only."""
    stmt = (
        select(Trial.id, Trial.number, Trial.state, Trial.last_step, Trial.curve_seq)
        .where(Trial.study_id == study_id)
        .order_by(Trial.curve_seq, Trial.id)
        .limit(limit)
    )
    if since is not None:
        stmt = stmt.where(Trial.curve_seq > since)
    return [CurveRow(*row) for row in session.execute(stmt)]


def best(
    session: Session,
    study_id: int,
    n: int,
    name: str,
    objective: int,
    *,
    minimize: bool,
    multi: bool,
) -> list[CurveRow]:
    """What the overview of a large study shows first: its ``n`` best complete trials with a
    curve of metric ``name``, by objective ``objective`` (of a multi-objective study when
    ``multi``), and at most ``n`` unfinished ones (running and waiting before paused, the
    latest changed first); each trial once, oldest change first."""
    cols = (Trial.id, Trial.number, Trial.state, Trial.last_step, Trial.curve_seq)
    mine = Trial.study_id == study_id
    finished = [s.value for s in FINISHED_TRIAL_STATES]
    paused_last = case((Trial.state == TrialState.PAUSED.value, 1), else_=0)
    unfinished = (
        select(*cols)
        .where(mine, Trial.state.not_in(finished))
        .order_by(paused_last, Trial.curve_seq.desc(), Trial.id)
        .limit(n)
    )
    curve = TrialCurve.__table__.c
    has_curve = exists().where(curve.trial_id == Trial.id, curve.name == name)
    complete = select(*cols).where(mine, Trial.state == TrialState.COMPLETE.value, has_curve)
    rows = [CurveRow(*r) for r in session.execute(unfinished)]
    if not multi:
        by = Trial.value.asc() if minimize else Trial.value.desc()
        ranked = complete.where(Trial.value.is_not(None)).order_by(by, Trial.id).limit(n)
        rows += [CurveRow(*r) for r in session.execute(ranked)]
    else:
        scored = []
        for *row, values in session.execute(complete.add_columns(Trial.values)):
            value = values[objective] if values and objective < len(values) else None
            if isinstance(value, (int, float)) and value == value:  # not None, not NaN
                scored.append((value if minimize else -value, row[0], CurveRow(*row)))
        rows += [row for *_, row in sorted(scored)[:n]]
    # Read by two statements: on PostgreSQL a trial that finished between them is in both.
    once: dict[int, CurveRow] = {}
    for row in rows:
        if row.id not in once or row.curve_seq > once[row.id].curve_seq:
            once[row.id] = row
    return sorted(once.values(), key=lambda r: (r.curve_seq, r.id))


def of_trials(session: Session, trial_ids: Sequence[int], name: str) -> dict[int, Curve]:
    """The curves of metric ``name`` of these trials (those that have one)."""
    rows = _stored(session, trial_ids, name, TrialCurve.__table__.c.shift)
    return {trial_id: Curve.loads(shift, text or "[]") for trial_id, shift, text in rows}


def kept_of_trials(session: Session, trial_ids: Sequence[int], name: str) -> dict[int, Kept]:
    """What :func:`of_trials` reads, as the overview sends it: read straight from the stored
    rows (no buckets built; the count from its column), a third of the time at 10,000 trials."""
    out: dict[int, Kept] = {}
    for trial_id, n, text in _stored(session, trial_ids, name, TrialCurve.__table__.c.n):
        rows = jsontext.loads_small_ints(text or "[]")
        rows.sort()  # written in index order (``Curve.dumps``): a pass that checks it
        out[trial_id] = Kept(*_kept_points(rows), n)
    return out


def _stored(
    session: Session, trial_ids: Sequence[int], name: str, column: Any
) -> Iterable[tuple[int, Any, str | None]]:
    """``(trial id, column, buckets text)`` of these trials' stored curves of ``name``."""
    table = TrialCurve.__table__
    for k in range(0, len(trial_ids), IN_CHUNK):
        chunk = list(trial_ids[k : k + IN_CHUNK])
        yield from session.execute(
            select(table.c.trial_id, column, table.c.buckets).where(
                table.c.trial_id.in_(chunk), table.c.name == name
            )
        )


def names_of(session: Session, trial_ids: Sequence[int]) -> set[str]:
    """The metric names these trials have curves of."""
    table = TrialCurve.__table__
    names: set[str] = set()
    for k in range(0, len(trial_ids), IN_CHUNK):
        chunk = list(trial_ids[k : k + IN_CHUNK])
        names.update(
            session.scalars(select(table.c.name).where(table.c.trial_id.in_(chunk)).distinct())
        )
    return names
