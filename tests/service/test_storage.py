"""The storage contract, one suite run against SQLite and PostgreSQL: what each call of
``Storage`` and of the per-table modules promises, the errors it raises, and database
failures surfacing as DatabaseUnavailable."""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, func, insert, select, text

from hpo.api.demo import free_port
from hpo.api.routes.dashboard import _fit_and_keep
from hpo.service import analysis, reporting
from hpo.service.analysis_worker import InThread, fit_importance
from hpo.service.db import make_engine, upgrade_schema
from hpo.service.db.engine import SQLITE_BUSY_TIMEOUT_S
from hpo.service.db.models import MetricPoint, StudyAnalysis, Trial, utcnow
from hpo.service.errors import DatabaseUnavailable, NameTaken, StudyNotFound, TrialNotFound
from hpo.service.records import MetricInput
from hpo.service.spec import StudySpec
from hpo.service.states import StudyState, TrialState
from hpo.service.storage import Storage, analyses, metrics, studies, trials
from hpo.service.storage.records import spec_of
from hpo.service.storage.seqs import KnownSeqs
from hpo.service.storage.transitions import set_study_state, set_trial_state
from hpo.service.studies import StudyService
from tests.conftest import simple_spec


def add_study(storage: Storage, name: str = "s", **over: object) -> int:
    with storage.write() as s:
        return studies.insert(s, name, simple_spec(name, **over)).id


def add_trial(storage: Storage, study_id: int, x: float = 0.0, *, lease_s: float = 60) -> int:
    with storage.write() as s:
        study = studies.get(s, study_id, lock=True)
        trial = trials.insert(
            s, study, study.next_number, {"x": x}, {"sampler": "t"}, lease_s=lease_s, now=utcnow()
        )
        return trial.id


def complete(storage: Storage, trial_id: int, value: float) -> None:
    with storage.write() as s:
        study, trial = trials.lock(s, trial_id)
        set_trial_state(s, study, trial, TrialState.COMPLETE)
        trial.value = value


@contextmanager
def sent(storage: Storage) -> Iterator[list[tuple[str, object]]]:
    """The statements (with their parameters) sent to the database while the block runs."""
    statements: list[tuple[str, object]] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append((statement, parameters))

    event.listen(storage.engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        event.remove(storage.engine, "before_cursor_execute", seen)


# ----------------------------------------------------------------------- studies


def test_a_shared_database_in_memory_serves_many_threads_at_once() -> None:
    """A SQLite URI in memory shared by its connections (``mode=memory&cache=shared``): eight
    threads reading at once each keep their connection (SQLAlchemy's pool for ``mode=memory``
    kept five, closing a sixth thread's connection under another)."""
    url = f"sqlite:///file:threads{os.getpid()}?mode=memory&cache=shared&uri=true"
    engine = make_engine(url)
    keep = engine.connect()  # the shared database lives while a connection holds it
    errors: list[BaseException] = []
    together = threading.Barrier(8)

    def read() -> None:
        try:
            with engine.connect().execution_options(readonly=True) as conn:
                together.wait(timeout=10)
                time.sleep(0.2)  # all eight connections open at once
                assert conn.execute(text("SELECT count(*) FROM studies")).scalar() == 1
        except BaseException as exc:
            errors.append(exc)

    try:
        upgrade_schema(engine)
        add_study(Storage(engine))
        readers = [threading.Thread(target=read) for _ in range(8)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(timeout=30)
        assert not errors, errors
    finally:
        keep.close()
        engine.dispose()


def test_a_new_study_runs_and_is_found_by_id_and_name(storage: Storage) -> None:
    sid = add_study(storage, "alpha")
    record = storage.get_study(sid)
    assert (record.name, record.state, record.n_trials) == ("alpha", StudyState.RUNNING, 0)
    assert record.counts == {
        "waiting": 0,
        "running": 0,
        "paused": 0,
        "complete": 0,
        "pruned": 0,
        "failed": 0,
    }
    assert storage.study_id("alpha") == sid == storage.study_id(str(sid))
    assert storage.spec_of(sid).name == "alpha"
    assert storage.study_seq(sid) == 1


def test_a_spec_assigned_in_a_transaction_is_the_one_read_after_it(storage: Storage) -> None:
    """The spec parsed from a loaded study is kept on it; assigning another spec (as every
    edit does) is seen by the next read in the same transaction, and after it."""
    sid = add_study(storage, "edited")
    with storage.write() as s:
        study = studies.get(s, sid)
        assert spec_of(study).budget.max_trials != 7
        assert spec_of(study) is spec_of(study)  # parsed once
        study.spec = {**study.spec, "budget": {**study.spec.get("budget", {}), "max_trials": 7}}
        assert spec_of(study).budget.max_trials == 7
    assert storage.spec_of(sid).budget.max_trials == 7


def test_unknown_studies_raise_study_not_found(storage: Storage) -> None:
    for call in (
        lambda: storage.get_study(999),
        lambda: storage.study_id("nobody"),
        lambda: storage.study_seq(999),
        lambda: storage.spec_of(999),
        lambda: storage.best(999),
        lambda: storage.list_trials(999),
    ):
        with pytest.raises(StudyNotFound):
            call()


def test_a_taken_name_raises_name_taken_and_stores_nothing(storage: Storage) -> None:
    add_study(storage, "twice")
    with pytest.raises(NameTaken), storage.write() as s:
        studies.insert(s, "twice", simple_spec("twice"))
    assert [r.name for r in storage.list_studies()[0]] == ["twice"]


def test_studies_page_newest_first_with_filters(storage: Storage) -> None:
    ids = [add_study(storage, f"p{i}") for i in range(5)]
    with storage.write() as s:
        set_study_state(studies.get(s, ids[1], lock=True), StudyState.PAUSED, reason="test")
    first, cursor = storage.list_studies(limit=2)
    assert [r.id for r in first] == ids[:2:-1] and cursor == ids[3]
    rest, end = storage.list_studies(limit=10, cursor=cursor)
    assert [r.id for r in rest] == ids[2::-1] and end is None
    assert [r.id for r in storage.list_studies(state="paused")[0]] == [ids[1]]
    assert [r.id for r in storage.list_studies(name="p3")[0]] == [ids[3]]
    assert [sid for sid, _, _ in storage.studies_in([StudyState.PAUSED])] == [ids[1]]
    assert [sid for sid, _, _ in storage.studies_in([StudyState.RUNNING])] == [
        i for i in ids if i != ids[1]
    ]
    runs = add_study(storage, "runs", trainable={"name": "image-classification", "config": {}})
    dispatched = storage.studies_in([StudyState.RUNNING], dispatched=True)
    assert [(sid, state, spec.name) for sid, state, spec in dispatched] == [
        (runs, StudyState.RUNNING, "runs")
    ]


def test_every_write_bumps_the_study_seq_and_stamps_the_trials(storage: Storage) -> None:
    sid = add_study(storage)
    tid = add_trial(storage, sid)
    seq = storage.study_seq(sid)
    storage.set_checkpoint(tid, "/ck/1")
    storage.merge_placement(tid, {"node": "a"})
    storage.merge_placement(tid, {"world_size": 2, "handle": "secret"})
    storage.set_test_metrics(tid, {"accuracy": 0.9})
    assert storage.study_seq(sid) == seq + 4
    trial = storage.get_trial(tid)
    assert trial.seq == seq + 4
    assert trial.placement == {"node": "a", "world_size": 2}  # the executor handle stays inside
    assert storage.trial_checkpoint(tid) == "/ck/1" and trial.has_checkpoint
    assert trial.test_metrics == {"accuracy": 0.9}


def test_a_studys_seq_is_known_until_a_write_of_this_process_changes_it(
    storage: Storage,
) -> None:
    """``known_study_seq`` (answers a poll's ETag check without a read) gives the seq as last
    read; a write that changes the study, or deletes it, forgets it before it returns; a
    report's points (only the curves' cursor moves) do not; a read that began before such a
    write ended is not kept."""
    sid = add_study(storage)
    tid = add_trial(storage, sid)
    assert storage.known_study_seq(sid) is None  # never read
    seq = storage.study_seq(sid)
    assert storage.known_study_seq(sid) == seq
    assert reporting.report(storage, tid, [MetricInput(1, "loss", 1.0)]) is False
    assert storage.known_study_seq(sid) == seq == storage.study_seq(sid)
    storage.set_checkpoint(tid, "/ck/1")  # a change of the study's seq
    assert storage.known_study_seq(sid) is None
    changed = storage.study_seq(sid)
    assert changed > seq and storage.known_study_seq(sid) == changed
    read = storage.seqs.reading(sid)  # a read begins, a write ends, the read ends
    complete(storage, tid, 0.5)
    read(changed)
    assert storage.known_study_seq(sid) is None
    storage.study_seq(sid)
    with storage.write() as s:
        studies.delete(s, studies.get(s, sid))
    assert storage.known_study_seq(sid) is None


def test_a_known_seq_is_forgotten_after_its_max_age() -> None:
    now = [100.0]
    seqs = KnownSeqs(max_age_s=1.0, clock=lambda: now[0])
    seqs.reading(7)(42)
    now[0] += 1.0
    assert seqs.get(7) == 42
    now[0] += 0.01
    assert seqs.get(7) is None  # a change through another server shows within max_age_s
    seqs.reading(7)(43)
    seqs.changed([8])  # another study's write
    assert seqs.get(7) == 43
    # bounded: past MAX_STUDIES changed studies it starts afresh; a read begun before is lost
    seqs.MAX_STUDIES = 3
    read = seqs.reading(7)
    seqs.changed([9, 10])
    seqs.changed([11])
    read(44)
    assert seqs.get(7) == 43 and len(seqs._changed_at) <= 3
    seqs.reading(7)(45)
    assert seqs.get(7) == 45


def test_best_trial_minimizes_and_ties_go_to_the_lower_number(storage: Storage) -> None:
    sid = add_study(storage)
    assert storage.best(sid) == (None, [])
    ids = [add_trial(storage, sid, x) for x in (0.0, 1.0, 2.0)]
    for tid, value in zip(ids, (3.0, 1.0, 1.0), strict=True):
        complete(storage, tid, value)
    best, front = storage.best(sid)
    assert best.id == ids[1] and front == [best]
    assert storage.get_study(sid).best_trial.id == ids[1]


def test_best_trials_of_a_multi_objective_study_are_its_pareto_front(storage: Storage) -> None:
    objectives = [
        {"metric": "a", "direction": "minimize"},
        {"metric": "b", "direction": "maximize"},
    ]
    sid = add_study(storage, objective=objectives)
    ids = [add_trial(storage, sid) for _ in range(3)]
    for tid, values in zip(ids, ([1.0, 1.0], [2.0, 2.0], [2.0, 0.5]), strict=True):
        with storage.write() as s:
            study, trial = trials.lock(s, tid)
            set_trial_state(s, study, trial, TrialState.COMPLETE)
            trial.values = values
    best, front = storage.best(sid)
    assert best is None and [t.id for t in front] == ids[:2]


# ------------------------------------------------------------------------ trials


def test_trial_numbers_are_claimed_in_order_and_counted(storage: Storage) -> None:
    sid = add_study(storage)
    ids = [add_trial(storage, sid, x) for x in (0.5, 1.5)]
    record = storage.get_trial(ids[1])
    assert (record.number, record.state, record.attempts) == (1, TrialState.RUNNING, 1)
    assert record.params == {"x": 1.5} and record.suggestion == {"sampler": "t"}
    assert [(e.state, e.detail) for e in record.events] == [("running", "suggested by t")]
    study = storage.get_study(sid)
    assert study.n_trials == 2 and study.counts["running"] == 2
    assert storage.get_trial(ids[0], events=False).events is None


def test_unknown_trials_raise_trial_not_found(storage: Storage) -> None:
    for call in (
        lambda: storage.get_trial(999),
        lambda: storage.trial_checkpoint(999),
        lambda: storage.metrics(999),
        lambda: storage.set_checkpoint(999, "/x"),
        lambda: storage.merge_placement(999, {}),
        lambda: storage.set_test_metrics(999, {}),
    ):
        with pytest.raises(TrialNotFound):
            call()
    with pytest.raises(TrialNotFound), storage.write() as s:
        trials.lock(s, 999)


def test_trial_pages_follow_the_change_cursor(storage: Storage) -> None:
    sid = add_study(storage)
    ids = [add_trial(storage, sid) for _ in range(3)]
    page, cursor = storage.list_trials(sid)
    assert [t.id for t in page] == ids and cursor == storage.study_seq(sid)
    assert storage.list_trials(sid, since=cursor) == ([], cursor)
    complete(storage, ids[0], 1.0)
    changed, after = storage.list_trials(sid, since=cursor)
    assert [t.id for t in changed] == [ids[0]] and after > cursor
    two, mid = storage.list_trials(sid, limit=2)
    assert len(two) == 2 and mid == two[-1].seq
    assert [t.id for t in storage.list_trials(sid, states=["complete"])[0]] == [ids[0]]


def test_active_trials_states_and_waiting_order(storage: Storage) -> None:
    sid = add_study(storage)
    ids = [add_trial(storage, sid) for _ in range(3)]
    complete(storage, ids[0], 1.0)
    for tid in reversed(ids[1:]):
        with storage.write() as s:
            study, trial = trials.lock(s, tid)
            set_trial_state(s, study, trial, TrialState.WAITING)
    assert sorted(t.id for t in storage.active_trials([sid])) == ids[1:]
    assert storage.active_trials([]) == []
    assert storage.trial_states([*ids, 999]) == {
        ids[0]: TrialState.COMPLETE,
        ids[1]: TrialState.WAITING,
        ids[2]: TrialState.WAITING,
    }
    with storage.read() as s:
        assert trials.first_waiting(s, sid) == ids[1]  # the lowest number first
        assert studies.count_active(s, sid) == (0, 2)
        assert sorted(studies.active_trial_ids(s, sid)) == ids[1:]


def test_the_first_waiting_trial_is_read_from_its_index_entry(storage: Storage) -> None:
    """The next waiting trial is the lowest-numbered one, among many trials in other states
    and many waiting. On SQLite the statement reads it from ix_trials_study_state_number's
    first entry for (study, waiting): no walk of the study's trials in number order (the
    plan before migration 0014) and no sort of the waiting ones."""
    sid = add_study(storage)
    rows = [
        {
            "study_id": sid,
            "number": n,
            "state": "waiting" if n % 3 == 0 and n >= 30 else "complete",
            "attempts": 1,
            "seq": 1,
            "created_at": utcnow(),
        }
        for n in range(300)
    ]
    with storage.write() as s:
        s.execute(insert(Trial), rows)
    with sent(storage) as statements, storage.read() as s:
        first = trials.first_waiting(s, sid)
    with storage.read() as s:
        assert s.scalar(select(Trial.number).where(Trial.id == first)) == 30
    if storage.engine.dialect.name != "sqlite":
        return
    [(statement, parameters)] = [(q, p) for q, p in statements if "FROM trials" in q]
    with storage.engine.connect() as conn:
        plan = [
            row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
        ]
    assert plan == [
        "SEARCH trials USING COVERING INDEX ix_trials_study_state_number (study_id=? AND state=?)"
    ], plan


def test_leases_expire_and_renew(storage: Storage) -> None:
    sid = add_study(storage, lease_s=30)
    short, long = add_trial(storage, sid, lease_s=0.001), add_trial(storage, sid)
    later = utcnow() + timedelta(seconds=1)
    with storage.read() as s:
        assert trials.expired(s, later) == [short]
        assert trials.expired(s, later, study_id=sid + 1) == []
    with storage.write() as s:
        trials.renew_leases(s, [short, long], utcnow())
    with storage.read() as s:
        assert trials.expired(s, later) == []
    lease = storage.get_trial(short).lease_expires_at - utcnow()
    assert timedelta(seconds=25) < lease <= timedelta(seconds=30)


def test_deleting_a_study_deletes_its_trials_and_points(storage: Storage) -> None:
    sid = add_study(storage)
    tid = add_trial(storage, sid)
    with storage.write() as s:
        _, trial = trials.lock(s, tid)
        metrics.add(s, trial, [MetricInput(0, "loss", 1.0)], utcnow())
    with storage.write() as s:
        studies.delete(s, studies.get(s, sid, lock=True))
    with pytest.raises(TrialNotFound):
        storage.get_trial(tid)
    with storage.read() as s:
        left = select(func.count()).select_from(MetricPoint).where(MetricPoint.trial_id == tid)
        assert s.scalar(left) == 0


# ----------------------------------------------------------------------- metrics


def test_metric_points_read_back_in_step_order(storage: Storage) -> None:
    sid = add_study(storage)
    a, b = add_trial(storage, sid), add_trial(storage, sid)
    with storage.write() as s:
        _, ta = trials.lock(s, a)
        metrics.add(
            s,
            ta,
            [MetricInput(2, "loss", 0.5), MetricInput(1, "loss", 0.7), MetricInput(1, "acc", 0.1)],
            utcnow(),
        )
        assert metrics.last_value(s, a, "loss") == 0.5 and metrics.last_value(s, b, "loss") is None
        assert (
            metrics.step_below(s, a, "loss", 2) == 1 and metrics.step_below(s, a, "loss", 1) is None
        )
        assert metrics.steps_between(s, a, "loss", 1, 5) == {1, 2}
        assert metrics.steps_between(s, b, "loss", 1, 5) == set()
        assert metrics.last_points(s, [a, b], "loss") == {a: {2: 0.5}}
    assert [(p.step, p.name) for p in storage.metrics(a)] == [(1, "loss"), (1, "acc"), (2, "loss")]
    assert [p.step for p in storage.metrics(a, name="loss", since_step=1)] == [2]
    assert storage.metrics(b) == []


def test_the_step_below_a_report_is_read_from_one_index_entry(storage: Storage) -> None:
    """A report asks for its trial's last step of the watched metric below its first new
    step. At 20,000 steps in a table never analysed (a new database filling up, where
    PostgreSQL planned ``max(step)`` as a walk of every step below), the statement reads one
    entry of the (trial, name, step) index: its cost does not grow with the trial's length."""
    sid = add_study(storage)
    tid = add_trial(storage, sid)
    rows = [
        {"trial_id": tid, "study_id": sid, "attempt": 1, "step": n, "name": name, "value": 0.5}
        for n in range(20_000)
        for name in ("acc", "loss")
    ]
    with storage.write() as s:
        s.execute(insert(MetricPoint), rows)
    with sent(storage) as statements, storage.read() as s:
        assert metrics.step_below(s, tid, "loss", 19_990) == 19_989
    [(statement, parameters)] = [(q, p) for q, p in statements if "FROM metric_points" in q]
    with storage.engine.connect() as conn:
        if storage.engine.dialect.name == "sqlite":
            plan = [
                row[-1]
                for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            ]
            [step] = plan  # one search of the index, no sort, no scan of the table
            assert step.endswith(
                "metric_points USING COVERING INDEX ix_metric_points_trial_name_step "
                "(trial_id=? AND name=? AND step<?)"
            )
            return
        [[[plan]]] = conn.exec_driver_sql(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters
        ).all()
    scans = []
    nodes = [plan["Plan"]]
    while nodes:
        node = nodes.pop()
        nodes += node.get("Plans", [])
        if "Scan" in node["Node Type"]:
            scans.append((node.get("Index Name"), node["Actual Rows"]))
    assert scans == [("ix_metric_points_trial_name_step", 1)]  # index or index-only scan


def test_pruning_history_sees_other_trials_first_value_at_a_step(storage: Storage) -> None:
    sid = add_study(storage)
    ids = [add_trial(storage, sid) for _ in range(3)]
    for tid, steps in zip(ids, ({1: 5.0, 3: 4.0}, {2: 7.0}, {1: 1.0}), strict=True):
        with storage.write() as s:
            _, trial = trials.lock(s, tid)
            metrics.add(s, trial, [MetricInput(k, "loss", v) for k, v in steps.items()], utcnow())
    complete(storage, ids[1], 7.0)
    with storage.read() as s:
        history = metrics.PruningHistory(s, sid, ids[2], "loss")
        assert sorted(history.values_at(2)) == [4.0, 7.0]
        assert history.values_at(2, complete_only=True) == [7.0]
        assert history.n_complete() == 1


def test_the_count_of_complete_trials_is_read_once_a_seq_and_again_after_a_completion(
    storage: Storage,
) -> None:
    """A report's pruner counts the study's complete trials. For a seq this server counted
    them at (in any report) the count comes from memory; a trial that completes bumps the
    seq, and the next report counts again."""
    sid = add_study(storage)
    ids = [add_trial(storage, sid) for _ in range(3)]
    complete(storage, ids[0], 1.0)

    def n_complete() -> int:
        with storage.read() as s:
            seq = studies.get(s, sid).seq
            return metrics.PruningHistory(s, sid, ids[2], "loss", study_seq=seq).n_complete()

    def counts(statements: list[tuple[str, object]]) -> int:
        return sum("count(*)" in q for q, _ in statements)

    with sent(storage) as statements:
        assert [n_complete(), n_complete()] == [1, 1]
        assert counts(statements) == 1
        complete(storage, ids[1], 2.0)
        assert [n_complete(), n_complete()] == [2, 2]
        assert counts(statements) == 2


def test_values_at_a_rung_are_each_trials_first_step_at_or_after_it(storage: Storage) -> None:
    """ASHA's and PBT's question, asked trial by trial: the value at each trial's first step
    at or after the rung, the newest attempt's where two stored that step, only the trials of
    a bracket when asked so, none for a trial whose curve stops below the rung."""
    sid = add_study(storage)
    ids = [add_trial(storage, sid) for _ in range(4)]  # numbers 0..3
    curves = (
        {1: 9.0, 2: 8.0, 3: 7.0, 50: 1.0},  # attempt 1; attempt 2 below stores step 3 again
        {4: 6.0, 5: 5.0},
        {1: 4.0},  # stops below rung 3
        {3: 3.0},
    )
    for tid, steps in zip(ids, curves, strict=True):
        with storage.write() as s:
            _, trial = trials.lock(s, tid)
            points = [MetricInput(k, "loss", v) for k, v in steps.items()]
            metrics.add(s, trial, [*points, MetricInput(3, "acc", 0.5)], utcnow())
    with storage.write() as s:
        _, trial = trials.lock(s, ids[0])
        trial.attempts = 2
        metrics.add(s, trial, [MetricInput(3, "loss", 6.5)], utcnow())
    with storage.read() as s:
        found = metrics.values_at_by_trial(s, sid, "loss", 3)
        assert found == {ids[0]: 6.5, ids[1]: 6.0, ids[3]: 3.0}
        assert metrics.values_at_by_trial(s, sid, "loss", 3, bracket=(2, 1)) == {
            ids[1]: 6.0,
            ids[3]: 3.0,
        }
        assert metrics.values_at_by_trial(s, sid, "loss", 51) == {}
        assert metrics.values_at_by_trial(s, sid, "acc", 1) == {t: 0.5 for t in ids}
        history = metrics.PruningHistory(s, sid, ids[3], "loss")
        assert history.values_by_trial_at(6) == {ids[0]: 1.0}


def test_finished_trials_values_at_a_rung_are_looked_up_once(storage: Storage) -> None:
    """A trial finished a while ago takes no more points, so its value at a rung is read from
    the points once and kept: later questions look up only the trials still running or
    finished lately (a refused batch may still take points back, a finish may not be
    committed yet), and see those trials' new points."""
    from sqlalchemy import event, update

    sid = add_study(storage)
    ids = [add_trial(storage, sid) for _ in range(3)]
    for tid, value in zip(ids, (1.0, 2.0, 3.0), strict=True):
        with storage.write() as s:
            _, trial = trials.lock(s, tid)
            metrics.add(s, trial, [MetricInput(5, "loss", value)], utcnow())
    complete(storage, ids[0], 1.0)
    complete(storage, ids[1], 2.0)
    lookups: list[str] = []

    def seen(conn, cursor, statement, *_: object) -> None:  # type: ignore[no-untyped-def]
        if "metric_points" in statement:
            lookups.append(statement)

    def ask() -> tuple[dict[int, float], int]:
        lookups.clear()
        with storage.read() as s:
            return metrics.values_at_by_trial(s, sid, "loss", 4), len(lookups)

    def finished(*tids: int, ago_s: float) -> None:  # the helper complete() sets no time
        at = utcnow() - timedelta(seconds=ago_s)
        with storage.write() as s:
            s.execute(update(Trial).where(Trial.id.in_(tids)).values(finished_at=at))

    def settle(*tids: int) -> None:  # finished long enough ago
        finished(*tids, ago_s=metrics.RUNG_VALUES_SETTLED_S + 60)

    event.listen(storage.engine, "before_cursor_execute", seen)
    try:
        assert ask() == ({ids[0]: 1.0, ids[1]: 2.0, ids[2]: 3.0}, 1)
        settle(ids[0], ids[1])
        assert ask() == ({ids[0]: 1.0, ids[1]: 2.0, ids[2]: 3.0}, 1)
        assert ask() == ({ids[0]: 1.0, ids[1]: 2.0, ids[2]: 3.0}, 1)  # the running one only
        with storage.write() as s:  # the running trial's next attempt restates step 5
            _, trial = trials.lock(s, ids[2])
            trial.attempts = 2
            metrics.add(s, trial, [MetricInput(5, "loss", 2.5)], utcnow())
        assert ask() == ({ids[0]: 1.0, ids[1]: 2.0, ids[2]: 2.5}, 1)
        complete(storage, ids[2], 2.5)
        finished(ids[2], ago_s=1)
        assert ask() == ({ids[0]: 1.0, ids[1]: 2.0, ids[2]: 2.5}, 1)
        assert ask() == ({ids[0]: 1.0, ids[1]: 2.0, ids[2]: 2.5}, 1)  # just finished: not kept
        settle(ids[2])
        assert ask() == ({ids[0]: 1.0, ids[1]: 2.0, ids[2]: 2.5}, 1)  # settled since
        assert ask() == ({ids[0]: 1.0, ids[1]: 2.0, ids[2]: 2.5}, 0)  # all from memory
        late = add_trial(storage, sid)
        with storage.write() as s:
            _, trial = trials.lock(s, late)
            metrics.add(s, trial, [MetricInput(9, "loss", 0.5)], utcnow())
        assert ask() == ({ids[0]: 1.0, ids[1]: 2.0, ids[2]: 2.5, late: 0.5}, 1)
    finally:
        event.remove(storage.engine, "before_cursor_execute", seen)


def test_pruning_history_loads_the_steps_to_judge_together_and_answers_each_as_alone(
    storage: Storage,
) -> None:
    sid = add_study(storage)
    ids = [add_trial(storage, sid) for _ in range(4)]
    curves = ({1: 5.0, 3: 4.0, 8: 3.0}, {2: 7.0}, {1: 1.0}, {})
    for tid, steps in zip(ids, curves, strict=True):
        with storage.write() as s:
            _, trial = trials.lock(s, tid)
            metrics.add(s, trial, [MetricInput(k, "loss", v) for k, v in steps.items()], utcnow())
    for tid in (ids[0], ids[1], ids[3]):
        complete(storage, tid, 1.0)
    expected = {1: [5.0, 7.0], 2: [4.0, 7.0], 3: [4.0], 5: [3.0], 9: []}
    with storage.read() as s:
        history = metrics.PruningHistory(s, sid, ids[2], "loss", steps=list(expected))
        seen = {step: sorted(history.values_at(step, complete_only=True)) for step in expected}
    assert seen == expected
    with storage.read() as s:  # the same answers from memory, step by step
        history = metrics.PruningHistory(s, sid, ids[2], "loss")
        assert {k: sorted(history.values_at(k, complete_only=True)) for k in expected} == expected


def test_samplers_observe_every_trial_and_pruned_ones_last_value(storage: Storage) -> None:
    sid = add_study(storage)
    ids = [add_trial(storage, sid, x) for x in (1.0, 2.0)]
    with storage.write() as s:
        study, trial = trials.lock(s, ids[1])
        metrics.add(s, trial, [MetricInput(3, "loss", 0.25), MetricInput(1, "loss", 9.0)], utcnow())
        set_trial_state(s, study, trial, TrialState.PRUNED)
    complete(storage, ids[0], 0.5)
    with storage.read() as s:
        seen = trials.observed(s, studies.get(s, sid), "loss")
    assert [(t.number, t.state, t.params, t.values) for t in seen] == [
        (0, TrialState.COMPLETE, {"x": 1.0}, (0.5,)),
        (1, TrialState.PRUNED, {"x": 2.0}, None),
    ]
    assert seen[1].intermediate == {3: 0.25} and seen[1].finished


def test_observed_since_answers_what_changed_after_the_cursor_and_every_active_trial(
    storage: Storage,
) -> None:
    sid = add_study(storage)
    ids = [add_trial(storage, sid, x) for x in (1.0, 2.0, 3.0)]
    complete(storage, ids[0], 0.5)
    everything, cursor = storage.observed_since(sid, "loss")
    assert [(c.id, c.trial.number, c.trial.state) for c in everything] == [
        (ids[0], 0, TrialState.COMPLETE),
        (ids[1], 1, TrialState.RUNNING),
        (ids[2], 2, TrialState.RUNNING),
    ]
    assert cursor == storage.study_seq(sid) and all(c.seq <= cursor for c in everything)
    # Nothing changed: only the active trials come back, with their (old) seq.
    same, again = storage.observed_since(sid, "loss", cursor)
    assert [c.id for c in same] == ids[1:] and again == cursor
    assert all(c.seq <= cursor for c in same)
    # A finished trial comes back once, newer than the cursor; then never again.
    with storage.write() as s:
        study, trial = trials.lock(s, ids[2])
        metrics.add(s, trial, [MetricInput(4, "loss", 0.75)], utcnow())
        set_trial_state(s, study, trial, TrialState.PRUNED)
    fourth = add_trial(storage, sid, 4.0)
    changed, after = storage.observed_since(sid, "loss", cursor)
    assert after > cursor
    assert [(c.id, c.trial.state, c.seq > cursor) for c in changed] == [
        (ids[1], TrialState.RUNNING, False),
        (ids[2], TrialState.PRUNED, True),
        (fourth, TrialState.RUNNING, True),
    ]
    pruned = changed[1].trial
    assert pruned.params == {"x": 3.0} and pruned.intermediate == {4: 0.75}
    assert [c.id for c in storage.observed_since(sid, "loss", after)[0]] == [ids[1], fourth]
    # The answer applied to what was read before equals a full read.
    full = {c.id: c.trial for c in storage.observed_since(sid, "loss")[0]}
    merged = {c.id: c.trial for c in everything} | {c.id: c.trial for c in changed}
    assert merged == full
    with pytest.raises(StudyNotFound):
        storage.observed_since(999, "loss")


# ------------------------------------------------------ database failures → 503


def unreachable_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'no-such-dir' / 'hpo.db'}"
    return f"postgresql://postgres@127.0.0.1:{free_port()}/hpo"  # nothing listens there


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_an_unreachable_database_raises_database_unavailable(kind: str, tmp_path: Path) -> None:
    storage = Storage(make_engine(unreachable_url(kind, tmp_path)))
    calls = (
        storage.ping,
        lambda: storage.get_study(1),
        lambda: storage.list_studies(),
        lambda: storage.set_checkpoint(1, "/x"),
    )
    for call in calls:
        with pytest.raises(DatabaseUnavailable, match="unreachable") as caught:
            call()
        assert caught.value.retry_after_s > 0 and caught.value.code == "database_unavailable"
    storage.engine.dispose()


def test_a_locked_sqlite_database_raises_database_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "hpo.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade_schema(engine)
    engine.dispose()
    impatient = Storage(create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05}))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DatabaseUnavailable, match="locked") as caught, impatient.write() as s:
            studies.insert(s, "blocked", simple_spec("blocked"))
        assert caught.value.retry_after_s == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with impatient.write() as s:  # the lock is gone: the same write succeeds
        studies.insert(s, "blocked", simple_spec("blocked"))
    assert impatient.list_studies()[0][0].name == "blocked"
    impatient.engine.dispose()


def test_errors_of_the_request_itself_are_not_database_failures(storage: Storage) -> None:
    with pytest.raises(ZeroDivisionError), storage.write():
        1 / 0  # noqa: B018
    storage.ping()


def test_points_store_the_same_time_by_either_insert(storage: Storage) -> None:
    """A report's usual insert (SQLite: an executemany of plain tuples) and the one that
    returns ids store the time alike: as the column's own type writes it (text with
    microseconds on SQLite, even when they are 0), read back as the same UTC time."""
    from datetime import datetime, timezone

    from sqlalchemy import text

    sid = add_study(storage)
    a, b = add_trial(storage, sid), add_trial(storage, sid)
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)  # microsecond 0
    with storage.write() as s:
        metrics.add(s, s.get(Trial, a), [MetricInput(1, "loss", 0.5)], now, ids=False)
        assert metrics.add(s, s.get(Trial, b), [MetricInput(1, "loss", 0.5)], now, ids=True)
    with storage.read() as s:
        stored = s.execute(text("SELECT trial_id, time FROM metric_points ORDER BY trial_id"))
        raw = [time for _, time in stored]
    assert raw[0] == raw[1], raw
    assert [p.time for t in (a, b) for p in storage.metrics(t)] == [now, now]


def test_points_keep_every_name_and_the_exact_value_of_each_float(storage: Storage) -> None:
    """Names that need quoting in an array literal (quotes, backslashes, commas, braces,
    spaces, ``NULL``, non-ASCII) and floats that a short decimal would round (subnormals, the
    largest double, 0.1 + 0.2, -0.0, ±inf) come back exactly, steps up to 2**62, on
    either database: PostgreSQL's insert sends them as array literals."""
    names = ['a"b', "back\\slash", "x,y", "{br}", " sp ", "NULL", "ü·λ", "plain"]
    values = [5e-324, 1.7976931348623157e308, 0.1 + 0.2, -0.0, math.inf, -math.inf, 1 / 3]
    points = [
        MetricInput(step, name, values[(step + k) % len(values)])
        for k, name in enumerate(names)
        for step in (0, 1, 2**62)
    ]
    sid = add_study(storage)
    tid = add_trial(storage, sid)
    with storage.write() as s:
        metrics.add(s, s.get(Trial, tid), points, utcnow(), ids=False)
    stored = {(p.name, p.step): p.value for p in storage.metrics(tid)}
    assert set(stored) == {(p.name, p.step) for p in points}
    for p in points:
        got = stored[(p.name, p.step)]
        assert got == p.value, (p, got)  # exact (SQLite keeps -0.0 as 0.0, which is equal)


def test_outcomes_page_what_the_analyses_read_and_move_only_with_trial_changes(
    storage: Storage,
) -> None:
    service = StudyService(storage)
    spec = StudySpec.model_validate(simple_spec("outcomes"))
    sid = service.create_study(spec).id
    asked = [service.ask(sid) for _ in range(7)]
    for k, t in enumerate(asked[:5]):
        service.tell(t.id, value=float((k * 3) % 5))
    records, _ = storage.list_trials(sid)
    got, cursor = [], None
    while True:  # pages of 2
        page, cursor = storage.outcomes(sid, since=cursor, limit=2)
        got += page
        if len(page) < 2:
            break
    by_id = {o.id: o for o in got}
    assert len(got) == len(by_id) == 7
    for r in records:
        o = by_id[r.id]
        assert (o.number, o.state, o.params, o.value, o.values, o.seq) == (
            r.number, r.state, r.params, r.value, r.values, r.seq
        )  # fmt: skip
    assert analysis.param_importance(spec, got) == analysis.param_importance(spec, records)
    assert analysis.contour(spec, got, "x", "n") == analysis.contour(spec, records, "x", "n")
    # metric points are no change here (the trials page's cursor moves with them)
    service.report(asked[5].id, [MetricInput(1, "loss", 0.5)])
    assert storage.outcomes(sid, since=cursor) == ([], cursor)
    service.tell(asked[5].id, value=9.0)
    page, after = storage.outcomes(sid, since=cursor)
    assert [(o.id, o.state, o.value) for o in page] == [(asked[5].id, "complete", 9.0)]
    assert after > cursor


def test_analyses_kept_at_rest_by_seq_bounded_and_deleted_with_their_study(
    storage: Storage,
) -> None:
    """``storage.analyses``: what is kept under a key is ``current`` only at the seq it was
    asked at, and ``last`` at any; a store asked at an older seq does not replace a newer one
    (two servers fitting the same analysis at once); a study keeps its newest KEEP_PER_STUDY
    (by seq, then time); deleting it deletes them; a study deleted while its analysis was
    fitted keeps nothing (no error)."""
    sid, other = add_study(storage, "a"), add_study(storage, "b")
    name = analyses.key("importance", 0)
    assert name != analyses.key("importance", 1) and name.startswith("importance-")
    assert analyses.last(storage, sid, name) is None
    fitted = {"importances": {"x": 1.0}, "n_trials": 2**64 + 1}
    analyses.put(storage, sid, name, 5, fitted)
    assert analyses.current(storage, sid, name, 5) == fitted == analyses.last(storage, sid, name)
    assert analyses.current(storage, sid, name, 6) is None  # the study changed since
    analyses.put(storage, sid, name, 4, {"old": True})  # asked earlier, stored later
    assert analyses.current(storage, sid, name, 5) == fitted
    assert analyses.current(storage, sid, name, 4) is None
    analyses.put(storage, sid, name, 7, {"z": [[0.5, float("nan")]]})
    value = analyses.current(storage, sid, name, 7)
    assert value["z"][0][1] != value["z"][0][1]  # NaN survives
    assert analyses.last(storage, other, name) is None

    for i in range(analyses.KEEP_PER_STUDY + 5):
        analyses.put(storage, sid, analyses.key("contour", "x", "y", 0, i + 2), 8, {"i": i})
    analyses.put(storage, other, name, 1, {"kept": True})
    with storage.read() as s:
        rows = s.execute(select(StudyAnalysis.key).where(StudyAnalysis.study_id == sid)).all()
    assert len(rows) == analyses.KEEP_PER_STUDY
    newest = analyses.key("contour", "x", "y", 0, analyses.KEEP_PER_STUDY + 6)
    assert analyses.current(storage, sid, newest, 8) == {"i": analyses.KEEP_PER_STUDY + 4}
    assert analyses.last(storage, sid, name) is None  # asked at the oldest seq: went first
    assert analyses.last(storage, sid, analyses.key("contour", "x", "y", 0, 2)) is None

    StudyService(storage).delete_study(sid)
    with storage.read() as s:
        left = s.execute(select(StudyAnalysis.study_id)).scalars().all()
    assert left == [other]
    analyses.put(storage, sid, name, 9, {"late": True})  # the study is gone: nothing kept
    assert analyses.last(storage, sid, name) is None


def test_storing_an_analysis_does_not_wait_long_on_a_held_study_row(
    storage: Storage, db_url: str
) -> None:
    """Another connection holds the study's row (PostgreSQL) or the write lock (SQLite), as a
    stopped second server would: the store gives up after its lock timeout (1 s) or SQLite's
    busy timeout (3 s), so the answer waiting on it does not hang, and is still answered;
    reading what is kept is not held up at all."""
    service = StudyService(storage)
    spec = StudySpec.model_validate(simple_spec("held"))
    sid = service.create_study(spec).id
    for _ in range(4):
        t = service.ask(sid)
        service.tell(t.id, value=t.params["x"])
    name = analyses.key("importance", 0)
    analyses.put(storage, sid, name, 1, {"kept": 1})
    holder = make_engine(db_url)
    try:
        # (SQLite: the engine's write transactions begin IMMEDIATE, taking the write lock)
        with holder.connect() as conn, conn.begin():
            lock = "" if storage.dialect == "sqlite" else " FOR UPDATE"
            conn.execute(text(f"SELECT id FROM studies WHERE id = :id{lock}"), {"id": sid})
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                analyses.put(storage, sid, analyses.key("importance", 1), 2, {"kept": 2})
            bound = (
                SQLITE_BUSY_TIMEOUT_S if storage.dialect == "sqlite" else analyses.LOCK_TIMEOUT_S
            )
            assert time.monotonic() - started < bound + 3
            assert analyses.current(storage, sid, name, 1) == {"kept": 1}
            # the dashboard's job: the fit is answered though it could not be kept
            seq, other = storage.study_seq(sid), analyses.key("importance", 9)
            here, fit = InThread(storage), fit_importance
            answer = _fit_and_keep(here, storage, other, seq, asdict, fit, sid, spec, 0)
            assert answer.n_trials == 4 and analyses.last(storage, sid, other) is None
    finally:
        holder.dispose()
    analyses.put(storage, sid, analyses.key("importance", 1), 2, {"kept": 2})  # released
    assert analyses.current(storage, sid, analyses.key("importance", 1), 2) == {"kept": 2}


def test_a_study_whose_page_needs_a_fit_is_found_at_start(service: StudyService) -> None:
    """``analyses.any_unkept_past(n)``: some study past ``n`` complete trials has no fit kept
    for its current seq (the server then starts its analysis worker with it)."""
    storage = service.storage
    small = service.create_study(StudySpec.model_validate(simple_spec("small"))).id
    big = service.create_study(StudySpec.model_validate(simple_spec("big"))).id
    for sid, n in ((small, 2), (big, 3)):
        for _ in range(n):
            t = service.ask(sid)
            service.tell(t.id, value=1.0)
    service.ask(big)  # a running trial counts for nothing
    first = analyses.key("importance", 0)
    assert analyses.any_unkept_past(storage, 2, first)
    assert not analyses.any_unkept_past(storage, 3, first)
    analyses.put(storage, big, first, storage.study_seq(big) - 1, {})
    assert analyses.any_unkept_past(storage, 2, first)  # kept for an older seq
    analyses.put(storage, big, analyses.key("contour", "x", "n", 0, 24), storage.study_seq(big), {})
    assert analyses.any_unkept_past(storage, 2, first)  # another analysis is not the one
    analyses.put(storage, big, first, storage.study_seq(big), {})
    assert not analyses.any_unkept_past(storage, 2, first)
    t = service.ask(big)
    service.tell(t.id, value=2.0)  # the study changed since
    assert analyses.any_unkept_past(storage, 2, first)


def test_a_studys_points_come_a_page_of_trials_at_a_time(service: StudyService) -> None:
    """``metrics.of_study``: each trial's points as ``of_trial`` gives them (of a step two
    attempts reported, the newest attempt's), trials in id order; a page ends at a trial
    boundary once it holds ``max_points``, and the cursor resumes after its last trial."""
    from hpo.service.executor import FailureClass

    sid = service.create_study(StudySpec.model_validate(simple_spec("pages", max_retries=1))).id
    asked = [service.ask(sid) for _ in range(4)]
    for i, t in enumerate(asked):  # trial i: steps 0 .. 2, value 10 i + step
        points = [MetricInput(step, "loss", 10.0 * i + step) for step in range(3)]
        service.report(t.id, points, attempt=1)
    service.fail_attempt(asked[0].id, "lost", failure_class=FailureClass.INFRASTRUCTURE)
    again = service.ask(sid)
    assert (again.id, again.attempts) == (asked[0].id, 2)
    service.report(again.id, [MetricInput(1, "loss", -1.0)], attempt=2)
    own = {t.id: service.storage.metrics(t.id) for t in asked}
    assert [p.value for p in own[asked[0].id]] == [0.0, -1.0, 2.0]

    def pages(max_points: int, limit: int) -> list[list[tuple[int, int, float]]]:
        out, after = [], None
        while True:
            with service.storage.read() as s:
                page, after = metrics.of_study(
                    s, sid, after=after, limit=limit, max_points=max_points
                )
            out.append([(p.trial_id, p.step, p.value) for p in page])
            if after is None:
                return out

    every = [(t.id, p.step, p.value) for t in asked for p in own[t.id]]
    assert pages(100, 100) == [every]
    assert [len(p) for p in pages(4, 100)] == [6, 6]  # a page holds whole trials
    assert [len(p) for p in pages(1, 100)] == [3, 3, 3, 3]
    assert [len(p) for p in pages(100, 3)] == [9, 3]
    assert [p for page in pages(2, 1) for p in page] == every


def test_times_read_back_are_utc_whatever_the_servers_time_zone(storage: Storage) -> None:
    """PostgreSQL answers a timestamptz in the session's TimeZone, which Debian's initdb
    copies from the host: the API and the CSV export said +05:30 on such a server."""
    if storage.engine.dialect.name == "postgresql":
        name = storage.engine.url.database
        with storage.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"ALTER DATABASE \"{name}\" SET timezone TO 'Asia/Kolkata'"))
        storage.engine.dispose()  # new sessions take the database's setting
        with storage.engine.connect() as conn:
            assert conn.execute(text("SHOW timezone")).scalar() == "Asia/Kolkata"
    before = utcnow()
    sid = add_study(storage, "zoned")
    created = storage.get_study(sid).created_at
    assert created.utcoffset() == timedelta(0) and created.tzinfo is not None
    assert abs(created - before) < timedelta(minutes=1)
