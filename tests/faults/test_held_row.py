"""Drill (PostgreSQL): a study's row held by a transaction that does not end (a stopped
server, a psql session) holds a report for at most its lock timeout
(``reporting.REPORT_LOCK_TIMEOUT_S``), which then answers "the database is busy" (HTTP 503
with Retry-After) and stores nothing; once the row is free the same report goes through,
once. Before the timeout, such reports waited for ever, each holding one of the server's
report threads (hpo.api.pools.REPORTS: 8), so eight of them stalled the reports of every
other study too. One held row is not an outage: the control plane's health window (which
lets the lease sweep expire trials) is not reset by it."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, event, text

from hpo.service import attempts, reporting
from hpo.service.db import make_engine, upgrade_schema
from hpo.service.errors import DatabaseUnavailable, StaleAttempt, TrialNotFound
from hpo.service.records import MetricInput
from hpo.service.spec import StudySpec
from hpo.service.storage import Storage
from hpo.service.storage import studies as studies_storage
from hpo.service.storage.session import RETRY_LOCKED_S
from hpo.service.studies import StudyService
from tests.conftest import ServerProcess, create_pg_database, drop_pg_database, simple_spec
from tests.faults.conftest import postgres_part_missing


@pytest.fixture
def pg_service(pg_available: bool, monkeypatch: pytest.MonkeyPatch) -> Iterator[StudyService]:
    if not pg_available:
        pytest.skip("PostgreSQL not reachable")
    monkeypatch.setattr(reporting, "REPORT_LOCK_TIMEOUT_S", 0.5)
    url = create_pg_database()
    engine = make_engine(url)
    try:
        upgrade_schema(engine)
        yield StudyService(Storage(engine))
    finally:
        engine.dispose()
        drop_pg_database(url)


def _stored(service: StudyService, trial_id: int) -> list[int]:
    return [p.step for p in service.storage.metrics(trial_id)]


def _report_in_background(
    service: StudyService, trial_id: int, batch: list[MetricInput], **fencing: Any
) -> tuple[threading.Thread, list[BaseException | bool]]:
    """A report sent from a thread of its own (started): its answer, or the error it raised,
    lands in the list."""
    outcome: list[BaseException | bool] = []

    def send() -> None:
        try:
            outcome.append(service.report(trial_id, batch, **fencing))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    return sender, outcome


def test_a_report_waiting_for_a_held_study_row_is_answered_busy_and_stores_nothing(
    pg_service: StudyService,
) -> None:
    study = pg_service.create_study(StudySpec.model_validate(simple_spec("held")))
    trial = pg_service.ask(study.id)
    assert pg_service.report(trial.id, [MetricInput(1, "loss", 0.9)]) is False
    batch = [MetricInput(step, "loss", 1.0 / step) for step in (2, 3)]
    healthy_before = pg_service.storage.health.healthy_for()

    holder = pg_service.storage.engine.connect()
    holder.begin()
    holder.execute(text("SELECT id FROM studies WHERE id = :id FOR UPDATE"), {"id": study.id})
    try:
        sender, outcome = _report_in_background(pg_service, trial.id, batch)
        sender.join(timeout=30)  # far past the 0.5-s timeout; without it, it never returns
        assert not sender.is_alive(), "the report still waits for the held row"
    finally:
        holder.rollback()
        holder.close()
    sender.join(timeout=30)
    [answer] = outcome
    assert isinstance(answer, DatabaseUnavailable), answer
    assert "lock timeout" in str(answer) and answer.retry_after_s == RETRY_LOCKED_S
    assert _stored(pg_service, trial.id) == [1]
    assert pg_service.storage.health.healthy_for() >= healthy_before  # no outage begun

    # the row is free again: the client's retry of the same batch goes through, once
    assert pg_service.report(trial.id, batch) is False
    assert pg_service.report(trial.id, batch) is False
    assert _stored(pg_service, trial.id) == [1, 2, 3]


def _waiting_for_a_lock(engine: Engine) -> int:
    """The backend of this database that waits for a row lock (the report's)."""
    return _waiting_for_locks(engine, 1)[0]


def _written_by(engine: Engine, pid: int) -> set[str]:
    """The tables the backend ``pid`` has written in its open transaction."""
    with engine.connect() as probe:
        rows = probe.execute(
            text(
                "SELECT relation::regclass::text FROM pg_locks WHERE pid = :pid "
                "AND mode = 'RowExclusiveLock' AND locktype = 'relation'"
            ),
            {"pid": pid},
        )
        return {name for (name,) in rows}


def test_reports_of_one_study_waiting_together_share_no_lock_on_its_row(
    pg_service: StudyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three trials' first reports wait together for their study's row, held by a second
    connection, with their points and curves written. The row's only locker is still that
    connection: the points have no foreign key and the curves' names the trial, not the
    study (migrations 0013 and 0015), so the inserts take no share of the study's row, which
    PostgreSQL records as a MultiXact (before, ``pgrowlocks`` showed the row as a MultiXact
    held by all four). Then each report is stored once."""
    monkeypatch.setattr(reporting, "REPORT_LOCK_TIMEOUT_S", 30.0)
    engine = pg_service.storage.engine
    study = pg_service.create_study(StudySpec.model_validate(simple_spec("shared")))
    trials = [pg_service.ask(study.id) for _ in range(3)]
    with engine.begin() as conn:
        if not conn.execute(
            text("SELECT 1 FROM pg_available_extensions WHERE name = 'pgrowlocks'")
        ).first():
            postgres_part_missing("PostgreSQL's contrib extension pgrowlocks")
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS pgrowlocks"))

    holder = engine.connect()
    holder.begin()
    holder_pid = holder.execute(text("SELECT pg_backend_pid()")).scalar_one()
    holder.execute(
        text("SELECT id FROM studies WHERE id = :id FOR NO KEY UPDATE"), {"id": study.id}
    )
    try:
        senders = [
            _report_in_background(pg_service, t.id, [MetricInput(1, "loss", 0.5)]) for t in trials
        ]
        waiting = _waiting_for_locks(engine, len(trials))
        for pid in waiting:
            assert {"metric_points", "trial_curves"} <= _written_by(engine, pid)
        with engine.connect() as probe:
            locks = probe.execute(text("SELECT multi, pids FROM pgrowlocks('studies')")).all()
        holder.commit()
    finally:
        holder.close()
    assert [(multi, list(pids)) for multi, pids in locks] == [(False, [holder_pid])]
    for sender, outcome in senders:
        sender.join(timeout=30)
        assert outcome == [False]
    for t in trials:
        assert _stored(pg_service, t.id) == [1]


def test_a_study_deleted_while_its_trials_stream_is_deleted_and_leaves_nothing(
    pg_service: StudyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight trials stream 100-point reports without pause; the study is deleted meanwhile.
    A report holds its curve rows (and, writing a metric's first one, a share of its trial's
    row for that row's foreign-key check) before it takes the study's row, where a delete
    takes the study's row and then, through its cascade, the trials': the two met in a
    deadlock, and the delete was the one ended (503) every time. Now the delete goes through
    at its first call, and nothing of the study is left: no trial, point or curve. Each
    report is stored, told to stop, told the trial is gone, or (the side ended in a
    deadlock) told the database is busy: no other error."""
    monkeypatch.setattr(reporting, "REPORT_LOCK_TIMEOUT_S", 5.0)  # the default
    engine = pg_service.storage.engine
    study = pg_service.create_study(StudySpec.model_validate(simple_spec("streamed")))
    trials = [pg_service.ask(study.id) for _ in range(8)]
    stop = threading.Event()
    answers: Counter[str] = Counter()
    unexpected: list[BaseException] = []

    def stream(trial_id: int) -> None:
        step = 0
        while not stop.is_set():
            batch = [MetricInput(step + i, "loss", 1.0 / (step + i + 1)) for i in range(100)]
            step += 100
            try:
                answers["stop" if pg_service.report(trial_id, batch) else "stored"] += 1
            except TrialNotFound:
                answers["gone"] += 1
                return
            except DatabaseUnavailable:
                answers["busy"] += 1
            except BaseException as exc:  # handed to the test's thread
                unexpected.append(exc)
                return

    streams = [threading.Thread(target=stream, args=(t.id,)) for t in trials]
    for t in streams:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while answers["stored"] < 16:  # every stream under way
            assert time.monotonic() < deadline, answers
            time.sleep(0.01)
        pg_service.delete_study(study.id)
    finally:
        stop.set()
        for t in streams:
            t.join(timeout=30)
    assert not unexpected, unexpected
    with engine.connect() as conn:
        left = {
            table: conn.execute(
                text(f"SELECT count(*) FROM {table} WHERE study_id = :s"), {"s": study.id}
            ).scalar_one()
            for table in ("trials", "metric_points", "trial_curves")
        }
    assert left == {"trials": 0, "metric_points": 0, "trial_curves": 0}, answers


def test_a_delete_ended_in_a_deadlock_is_tried_again(
    pg_service: StudyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The case the stop before a delete leaves: a report already under way holds its
    trial's row (here a second connection takes the share a report's new curve row takes) and
    then asks for the study's row, which the delete holds while its cascade waits for that
    trial. PostgreSQL ends the delete (this connection checks for a deadlock only after
    20 s); the delete is tried again, waits for the connection to finish, and goes through."""
    study = pg_service.create_study(StudySpec.model_validate(simple_spec("deadlocked")))
    trial = pg_service.ask(study.id)
    assert pg_service.report(trial.id, [MetricInput(1, "loss", 0.9)]) is False
    engine = pg_service.storage.engine
    tries: list[int] = []
    delete = studies_storage.delete
    monkeypatch.setattr(
        studies_storage, "delete", lambda s, study: (tries.append(study.id), delete(s, study))
    )

    holder = engine.connect()
    holder.begin()
    holder.execute(text("SET LOCAL deadlock_timeout = '20s'"))
    holder.execute(text("SELECT id FROM trials WHERE id = :id FOR KEY SHARE"), {"id": trial.id})
    try:
        deleter, deleted = _in_background(pg_service.delete_study, study.id)
        _waiting_for_a_lock(engine)  # the delete's cascade, for the trial's row
        asker, asked = _in_background(
            holder.execute,
            text("SELECT id FROM studies WHERE id = :id FOR NO KEY UPDATE"),
            {"id": study.id},
        )
        asker.join(timeout=30)  # granted once the delete was ended
        assert asked and not isinstance(asked[0], BaseException), asked
        holder.commit()
    finally:
        holder.close()
    deleter.join(timeout=30)
    assert deleted == [[trial.id]], deleted
    assert tries == [study.id, study.id]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM trials")).scalar_one() == 0


def _until_gone(engine: Engine, pid: int, timeout_s: float = 30.0) -> None:
    """Wait until the backend ``pid`` of a killed server has ended: it gets the row it waited
    for, finds its client gone, and rolls back."""
    deadline = time.monotonic() + timeout_s
    with engine.connect() as probe:
        while probe.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
        ).scalar():
            assert time.monotonic() < deadline, "the killed server's backend lingers"
            probe.rollback()
            time.sleep(0.05)


def _in_background(call: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    """``call(*args)`` on a thread of its own (started): what it returned, or the error it
    raised, lands in the list."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call(*args))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _waiting_for_locks(engine: Engine, n: int, timeout_s: float = 10.0) -> list[int]:
    """The ``n`` backends of this database that wait for a lock."""
    deadline = time.monotonic() + timeout_s
    with engine.connect() as probe:
        while time.monotonic() < deadline:
            pids = probe.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            ).scalars()
            if len(pids := list(pids)) >= n:
                return pids
            probe.rollback()
            time.sleep(0.02)
    raise AssertionError(f"fewer than {n} writers came to wait for a lock")


_STUDY_OF = "SELECT study_id FROM trials WHERE id = :id"


@pytest.mark.parametrize(
    ("change", "named", "expected"),
    [
        ("UPDATE trials SET attempts = attempts + 1 WHERE id = :id", "attempt", "stale"),
        ("UPDATE trials SET state = 'pruned' WHERE id = :id", "attempt", "stop"),
        ("UPDATE trials SET attempts = attempts + 1 WHERE id = :id", None, "attempt 2"),
        (f"UPDATE studies SET state = 'stopped' WHERE id = ({_STUDY_OF})", "attempt", "stop"),
        (
            "UPDATE studies SET spec = jsonb_set(spec::jsonb, '{budget,max_steps}', '2')::json "
            f"WHERE id = ({_STUDY_OF})",
            "attempt",
            "budget",
        ),
        # an ask replayed with its Idempotency-Key reissues the token, same attempt number
        ("UPDATE trials SET attempt_token_hash = 'reissued' WHERE id = :id", "token", "stale"),
    ],
    ids=[
        "handed-out-again",
        "pruned",
        "unnamed-write-of-a-moved-trial",
        "study-stopped",
        "budget-added",
        "token-reissued",
    ],
)
def test_a_report_stores_its_points_before_the_study_row_and_keeps_none_of_a_moved_trial(
    pg_service: StudyService, change: str, named: str | None, expected: str
) -> None:
    """A report holds its study's row only at its end: its points and curves are written
    first (the row is then held ~3 ms instead of ~11 with 320 points), so the attempt they
    were written under is checked again once the row is granted. Here the trial moves on
    (another attempt, or pruned), its study is stopped or given a compute budget while the
    report waits for the row: a report naming its attempt stores nothing (409, or "stop"),
    or what the budget lets it; the scheduler's unnamed write is stored under the attempt
    current when it got the row."""
    study = pg_service.create_study(StudySpec.model_validate(simple_spec("moved")))
    trial = pg_service.ask(study.id)
    fencing: dict[str, Any] = {
        "attempt": {"attempt": 1},
        "token": {"token": attempts.parse(trial.attempt_token)},
        None: {},
    }[named]
    assert pg_service.report(trial.id, [MetricInput(1, "loss", 0.9)], **fencing) is False
    batch = [MetricInput(step, "loss", 1.0 / step) for step in (2, 3)]

    holder = pg_service.storage.engine.connect()
    holder.begin()
    holder.execute(
        text("SELECT id FROM studies WHERE id = :id FOR NO KEY UPDATE"), {"id": study.id}
    )
    try:
        sender, outcome = _report_in_background(pg_service, trial.id, batch, **fencing)
        waiting = _waiting_for_a_lock(pg_service.storage.engine)
        assert {"metric_points", "trial_curves"} <= _written_by(pg_service.storage.engine, waiting)
        holder.execute(text(change), {"id": trial.id})
        holder.commit()
    finally:
        holder.close()
    sender.join(timeout=30)
    [answer] = outcome
    with pg_service.storage.engine.connect() as conn:
        stored = conn.execute(
            text("SELECT step, attempt FROM metric_points WHERE trial_id = :id ORDER BY step"),
            {"id": trial.id},
        ).all()
        curve_n = conn.execute(
            text("SELECT n FROM trial_curves WHERE trial_id = :id"), {"id": trial.id}
        ).scalar_one()
    if expected == "stale":
        assert isinstance(answer, StaleAttempt), answer
    elif expected == "stop":
        assert answer is True
    if expected == "attempt 2":
        assert answer is False
        assert [tuple(row) for row in stored] == [(1, 1), (2, 2), (3, 2)]
        assert curve_n == 3
    elif expected == "budget":  # read again with its budget: step 3 is past it
        assert answer is True
        assert [tuple(row) for row in stored] == [(1, 1), (2, 1)]
        assert pg_service.storage.get_trial(trial.id).state == "pruned"
    else:
        assert [tuple(row) for row in stored] == [(1, 1)]
        assert curve_n == 1  # the curve at rest was rolled back with the points


def test_a_report_that_waited_for_the_study_row_has_its_lease_from_when_it_got_it(
    pg_service: StudyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report renews its trial's lease by ``lease_s`` from when its study's row was
    granted, not from before it waited for it: a report answered "continue" after a wait
    longer than the lease must not leave a lease that already ran out (the sweeper would
    fail the trial that just reported)."""
    monkeypatch.setattr(reporting, "REPORT_LOCK_TIMEOUT_S", 30.0)
    spec = StudySpec.model_validate({**simple_spec("lease"), "lease_s": 1.0})
    study = pg_service.create_study(spec)
    trial = pg_service.ask(study.id)
    assert pg_service.report(trial.id, [MetricInput(1, "loss", 0.9)], attempt=1) is False

    holder = pg_service.storage.engine.connect()
    holder.begin()
    holder.execute(
        text("SELECT id FROM studies WHERE id = :id FOR NO KEY UPDATE"), {"id": study.id}
    )
    try:
        batch = [MetricInput(2, "loss", 0.8)]
        sender, outcome = _report_in_background(pg_service, trial.id, batch, attempt=1)
        _waiting_for_a_lock(pg_service.storage.engine)
        time.sleep(1.5)  # longer than the lease
        holder.commit()
    finally:
        holder.close()
    sender.join(timeout=30)
    assert outcome == [False]
    with pg_service.storage.engine.connect() as conn:
        left = conn.execute(
            text("SELECT extract(epoch FROM lease_expires_at - now()) FROM trials WHERE id = :id"),
            {"id": trial.id},
        ).scalar_one()
    assert 0.5 < left <= 1.0


def test_an_uncontended_report_is_one_transaction_that_takes_the_study_row_last(
    pg_service: StudyService,
) -> None:
    """The usual report on PostgreSQL (a verdict to continue, no budget, nothing in its way)
    is answered by its one transaction: its points first, then the one statement that takes
    the study's row, then the commit; nothing rolled back and read again on the slower path."""
    study = pg_service.create_study(StudySpec.model_validate(simple_spec("one")))
    trial = pg_service.ask(study.id)
    assert pg_service.report(trial.id, [MetricInput(1, "loss", 0.9)], attempt=1) is False
    seen: list[str] = []
    ended: list[str] = []

    def statement(conn, cursor, text_, parameters, context, executemany) -> None:
        seen.append(" ".join(text_.split()))

    def rollback(conn) -> None:
        ended.append("rollback")

    def commit(conn) -> None:
        ended.append("commit")

    engine = pg_service.storage.engine
    listeners = [("before_cursor_execute", statement), ("rollback", rollback), ("commit", commit)]
    for name, fn in listeners:
        event.listen(engine, name, fn)
    try:
        batch = [MetricInput(2, "loss", 0.8), MetricInput(2, "acc", 0.5)]
        assert pg_service.report(trial.id, batch, attempt=1) is False
    finally:
        for name, fn in listeners:
            event.remove(engine, name, fn)
    assert ended == ["commit"]
    writes = [s for s in seen if s.startswith(("INSERT", "UPDATE", "WITH", "DELETE"))]
    assert writes[-1].startswith("WITH study AS")
    assert sum(s.startswith("WITH study AS") for s in seen) == 1
    assert not any("FOR NO KEY UPDATE" in s for s in seen)  # the study's row: by the CTE only


def test_a_report_in_a_deadlock_is_answered_busy_stores_nothing_and_begins_no_outage(
    pg_service: StudyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock order of a report (its trial's curve rows, then its study's row) is the
    reverse of a writer that holds a study's row and then folds that trial's curves (another
    report of the trial on the usual path, a batch taken back, the study deleted). PostgreSQL
    breaks such a deadlock by ending one of the two: when that is the report, it is answered
    "the database is busy" (503, Retry-After), stores nothing, and does not count as an outage
    of the database; the client's retry goes through, once."""
    monkeypatch.setattr(reporting, "REPORT_LOCK_TIMEOUT_S", 30.0)  # past deadlock_timeout (1 s)
    study = pg_service.create_study(StudySpec.model_validate(simple_spec("deadlock")))
    trial = pg_service.ask(study.id)
    assert pg_service.report(trial.id, [MetricInput(1, "loss", 0.9)], attempt=1) is False
    batch = [MetricInput(step, "loss", 1.0 / step) for step in (2, 3)]
    healthy_before = pg_service.storage.health.healthy_for()

    holder = pg_service.storage.engine.connect()
    holder.begin()
    holder.execute(text("SET LOCAL deadlock_timeout = '60s'"))  # the report's backend breaks it
    holder.execute(
        text("SELECT id FROM studies WHERE id = :id FOR NO KEY UPDATE"), {"id": study.id}
    )
    try:
        sender, outcome = _report_in_background(pg_service, trial.id, batch, attempt=1)
        _waiting_for_a_lock(pg_service.storage.engine)
        # the holder now folds the trial's curves: it waits for the report, which waits for it
        holder.execute(
            text("SELECT n FROM trial_curves WHERE trial_id = :id FOR UPDATE"), {"id": trial.id}
        )
        sender.join(timeout=30)
    finally:
        holder.rollback()
        holder.close()
    [answer] = outcome
    assert isinstance(answer, DatabaseUnavailable), answer
    assert "deadlock" in str(answer) and answer.retry_after_s == RETRY_LOCKED_S
    assert _stored(pg_service, trial.id) == [1]
    assert pg_service.storage.health.healthy_for() >= healthy_before  # no outage begun
    assert pg_service.report(trial.id, batch, attempt=1) is False
    assert pg_service.report(trial.id, batch, attempt=1) is False
    assert _stored(pg_service, trial.id) == [1, 2, 3]


def test_a_report_whose_trial_is_deleted_while_it_waits_is_answered_not_found(
    pg_service: StudyService,
) -> None:
    """The trial's curve rows are held while its study is deleted: the waiting report, which
    had found the trial running, then writes the curve rows that went with the trial again and
    meets their foreign key. It is answered "trial
    not found" (404), not with the database's integrity error (a 500)."""
    study = pg_service.create_study(StudySpec.model_validate(simple_spec("deleted")))
    trial = pg_service.ask(study.id)
    assert pg_service.report(trial.id, [MetricInput(1, "loss", 0.9)], attempt=1) is False

    holder = pg_service.storage.engine.connect()
    holder.begin()
    holder.execute(
        text("SELECT n FROM trial_curves WHERE trial_id = :id FOR UPDATE"), {"id": trial.id}
    )
    try:
        sender, outcome = _report_in_background(
            pg_service, trial.id, [MetricInput(2, "loss", 0.5)], attempt=1
        )
        _waiting_for_a_lock(pg_service.storage.engine)
        holder.execute(text("DELETE FROM studies WHERE id = :id"), {"id": study.id})
        holder.commit()
    finally:
        holder.close()
    sender.join(timeout=30)
    [answer] = outcome
    assert isinstance(answer, TrialNotFound), answer


@pytest.fixture
def pg_server(pg_available: bool, tmp_path: Path) -> Iterator[tuple[ServerProcess, Engine]]:
    """``hpo serve`` (no scheduler) on a fresh PostgreSQL database, and an engine on it."""
    if not pg_available:
        pytest.skip("PostgreSQL not reachable")
    url = create_pg_database()
    engine = make_engine(url)
    server = ServerProcess(url, tmp_path, {"HPO_SCHEDULER": "false"})
    try:
        server.start()
        yield server, engine
    finally:
        server.stop()
        engine.dispose()
        drop_pg_database(url)


def test_a_server_killed_while_its_report_waits_for_the_row_loses_and_doubles_nothing(
    pg_server: tuple[ServerProcess, Engine],
) -> None:
    """kill -9 of ``hpo serve`` while a report, its points already written, waits for the
    study's row: PostgreSQL rolls that transaction back, so none of it is stored; the client,
    which got no answer, sends the batch again to the restarted server (twice): each step is
    then stored exactly once (lost 0, duplicated 0)."""
    server, engine = pg_server
    with server.http() as http:
        study = http.post("/api/v1/studies", json=simple_spec("killed")).json()
        trial = http.post(f"/api/v1/studies/{study['id']}/ask").json()
    path = f"/api/v1/trials/{trial['trial_id']}/metrics"
    first = {"points": [{"step": 1, "name": "loss", "value": 1.0}], "attempt": 1}
    points = [{"step": s, "name": "loss", "value": 1.0 / s} for s in (2, 3, 4)]
    batch = {"points": points, "attempt": 1}
    with server.http() as http:
        assert http.post(path, json=first).status_code == 200

    def stored() -> list[int]:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT step FROM metric_points WHERE trial_id = :id ORDER BY step"),
                {"id": trial["trial_id"]},
            )
            return [step for (step,) in rows]

    holder = engine.connect()
    holder.begin()
    holder.execute(
        text("SELECT id FROM studies WHERE id = :id FOR NO KEY UPDATE"), {"id": study["id"]}
    )
    outcome: list[object] = []

    def send() -> None:
        try:
            with server.http() as http:
                outcome.append(http.post(path, json=batch, timeout=60).status_code)
        except httpx.TransportError as exc:
            outcome.append(exc)

    sender = threading.Thread(target=send)
    try:
        sender.start()
        waiting = _waiting_for_a_lock(engine)
        assert {"metric_points", "trial_curves"} <= _written_by(engine, waiting)
        server.kill()
        sender.join(timeout=30)
    finally:
        holder.rollback()
        holder.close()
    [answer] = outcome
    assert isinstance(answer, httpx.TransportError), answer  # no answer: the client resends
    _until_gone(engine, waiting)
    assert stored() == [1]  # nothing of the killed report was kept

    server.start()
    with server.http() as http:
        assert http.post(path, json=batch).status_code == 200
        assert http.post(path, json=batch).status_code == 200  # a replay
    steps = Counter(stored())
    lost = [s for s in range(1, 5) if steps[s] == 0]
    duplicated = [s for s, n in steps.items() if n > 1]
    assert (lost, duplicated) == ([], [])


def test_a_server_killed_between_a_deletes_stop_and_its_delete_loses_nothing(
    pg_server: tuple[ServerProcess, Engine],
) -> None:
    """kill -9 of ``hpo serve`` after a delete has stopped its study (committed) and while its
    delete waits for a curve row held by a second connection: the study is left stopped, with
    no trial running and every trial, point and curve still there; another study is untouched.
    The DELETE sent again to the restarted server deletes it, and nothing of it is left."""
    server, engine = pg_server

    def counts(study_id: int) -> dict[str, int]:
        with engine.connect() as conn:
            return {
                table: conn.execute(
                    text(f"SELECT count(*) FROM {table} WHERE study_id = :s"), {"s": study_id}
                ).scalar_one()
                for table in ("trials", "metric_points", "trial_curves")
            }

    ids = {}
    with server.http() as http:
        for name in ("deleted", "bystander"):
            study = http.post("/api/v1/studies", json=simple_spec(name)).json()
            for _ in range(2):
                trial = http.post(f"/api/v1/studies/{study['id']}/ask").json()
                body = {"points": [{"step": 1, "name": "loss", "value": 0.5}], "attempt": 1}
                path = f"/api/v1/trials/{trial['trial_id']}/metrics"
                assert http.post(path, json=body).status_code == 200
            ids[name] = study["id"]
    before = {name: counts(sid) for name, sid in ids.items()}
    assert before["deleted"] == {"trials": 2, "metric_points": 2, "trial_curves": 2}

    holder = engine.connect()
    holder.begin()
    holder.execute(
        text("SELECT trial_id FROM trial_curves WHERE study_id = :s LIMIT 1 FOR UPDATE"),
        {"s": ids["deleted"]},
    )

    def delete() -> int:
        with server.http() as http:
            return http.delete(f"/api/v1/studies/{ids['deleted']}", timeout=60).status_code

    deleter, answered = _in_background(delete)
    try:
        waiting = _waiting_for_a_lock(engine)  # the delete's cascade, for the curve row
        server.kill()
        deleter.join(timeout=30)
    finally:
        holder.rollback()
        holder.close()
    [answer] = answered
    assert isinstance(answer, httpx.TransportError), answer  # no answer: sent again
    _until_gone(engine, waiting)
    with engine.connect() as probe:
        state = probe.execute(
            text("SELECT state FROM studies WHERE id = :s"), {"s": ids["deleted"]}
        ).scalar_one()
        trial_states = probe.execute(
            text("SELECT state FROM trials WHERE study_id = :s"), {"s": ids["deleted"]}
        ).scalars()
        assert state == "stopped"
        assert "running" not in set(trial_states)
    assert {name: counts(sid) for name, sid in ids.items()} == before

    server.start()
    with server.http() as http:
        assert http.delete(f"/api/v1/studies/{ids['deleted']}").status_code == 204
        assert http.get(f"/api/v1/studies/{ids['deleted']}").status_code == 404
        assert http.get(f"/api/v1/studies/{ids['bystander']}").json()["state"] == "running"
    assert counts(ids["deleted"]) == {"trials": 0, "metric_points": 0, "trial_curves": 0}
    assert counts(ids["bystander"]) == before["bystander"]
