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
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from hpo.service import reporting
from hpo.service.db import make_engine, upgrade_schema
from hpo.service.errors import DatabaseUnavailable
from hpo.service.records import MetricInput
from hpo.service.spec import StudySpec
from hpo.service.storage import Storage
from hpo.service.storage.session import RETRY_LOCKED_S
from hpo.service.studies import StudyService
from tests.conftest import create_pg_database, drop_pg_database, simple_spec


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
    outcome: list[BaseException | bool] = []

    def send() -> None:
        try:
            outcome.append(pg_service.report(trial.id, batch))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    try:
        sender = threading.Thread(target=send)
        sender.start()
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
