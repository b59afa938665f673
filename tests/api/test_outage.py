"""A database outage seen through the served API: every route answers 503 with
``Retry-After`` and the usual error body (never a 500 or a dropped connection), ``/healthz``
says why, and the same server answers normally once the database is back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import (
    PG_ADMIN_URL,
    ServerProcess,
    create_pg_database,
    drop_pg_database,
    simple_spec,
)

API = "/api/v1"


@pytest.fixture
def pg_server(pg_available: bool, tmp_path: Path) -> Iterator[ServerProcess]:
    """A served control plane on a fresh PostgreSQL database of its own."""
    if not pg_available:
        pytest.skip("PostgreSQL not reachable")
    url = create_pg_database()
    proc = ServerProcess(url, tmp_path, {"HPO_SCHEDULER": "false"})
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
        drop_pg_database(url)


def set_reachable(database_url: str, reachable: bool) -> None:
    """Open or close the database to new connections; closing also ends the open ones."""
    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(reachable).lower()}')
        if not reachable:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )


def every_route(http: httpx.Client, sid: int, tid: int) -> list[httpx.Response]:
    """One request to each kind of route: reads, writes and the dashboard's."""
    return [
        http.get(f"{API}/studies"),
        http.get(f"{API}/studies/{sid}"),
        http.get(f"{API}/studies/{sid}/trials"),
        http.get(f"{API}/studies/{sid}/best"),
        http.get(f"{API}/studies/{sid}/export.csv"),
        http.patch(f"{API}/studies/{sid}", json={"budget": {"max_trials": 50}}),
        http.post(f"{API}/studies/{sid}/ask"),
        http.post(f"{API}/studies", json=simple_spec("during-the-outage")),
        http.get(f"{API}/trials/{tid}"),
        http.get(f"{API}/trials/{tid}/metrics"),
        http.post(
            f"{API}/trials/{tid}/metrics",
            json={"points": [{"step": 1, "name": "loss", "value": 1.0}]},
        ),
        http.post(f"{API}/trials/{tid}/heartbeat"),
        http.post(f"{API}/trials/{tid}/tell", json={"value": 1.0}),
        http.get(f"{API}/dashboard/studies"),
        http.get(f"{API}/studies/{sid}/curves"),
        http.get(f"{API}/trials/{tid}/series"),
    ]


def test_a_database_outage_is_503_with_retry_after_and_the_server_recovers(
    pg_server: ServerProcess,
) -> None:
    http = pg_server.http()
    sid = http.post(f"{API}/studies", json=simple_spec("outage")).json()["id"]
    tid = http.post(f"{API}/studies/{sid}/ask").json()["trial_id"]

    set_reachable(pg_server.database_url, False)
    try:
        for r in every_route(http, sid, tid):
            where = f"{r.request.method} {r.request.url.path}"
            assert r.status_code == 503, (where, r.status_code, r.text)
            assert int(r.headers["retry-after"]) >= 1, where
            body = r.json()
            assert body["error"] == "database_unavailable", where
            assert "database" in body["message"], where
        health = httpx.get(pg_server.url + "/healthz", timeout=30)
        assert health.status_code == 503 and "retry-after" in health.headers
        assert "unreachable" in health.json()["message"]
    finally:
        set_reachable(pg_server.database_url, True)

    # The same server, no restart: everything answers again and nothing of the outage stuck.
    assert httpx.get(pg_server.url + "/healthz", timeout=30).json()["status"] == "ok"
    study = http.get(f"{API}/studies/{sid}").json()
    assert study["spec"].get("budget", {}).get("max_trials") is None  # the PATCH was not stored
    assert [s["name"] for s in http.get(f"{API}/studies").json()["studies"]] == ["outage"]
    assert http.get(f"{API}/trials/{tid}/metrics").json()["points"] == []
    told = http.post(f"{API}/trials/{tid}/tell", json={"value": 1.0})
    assert told.status_code == 200 and told.json()["state"] == "complete"
