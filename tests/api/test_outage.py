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


# Routes that answer without the database: liveness (the process is up), and the server's
# own Prometheus counters. ``/healthz`` says why it is unhealthy (checked apart).
NO_DATABASE = {("GET", "/livez"), ("GET", "/metrics"), ("GET", "/healthz")}


def every_route(sid: int, tid: int) -> list[tuple[str, str, dict]]:
    """One request to each route of the API: (method, path template, httpx arguments)."""
    spec = simple_spec("during-the-outage")
    point = {"step": 1, "name": "loss", "value": 1.0}
    imported = {"trials": [{"params": {"x": 0.5, "n": 2}, "value": 1.0}]}
    suggest = {"name": "w", "param": {"type": "float", "low": 0.0, "high": 1.0}}
    return [
        ("GET", "/studies", {}),
        ("POST", "/studies", {"json": spec}),
        ("GET", "/studies/{study_id}", {}),
        ("PATCH", "/studies/{study_id}", {"json": {"budget": {"max_trials": 50}}}),
        ("DELETE", "/studies/{study_id}", {}),
        ("POST", "/studies/{study_id}/ask", {}),
        ("POST", "/studies/{study_id}/queue", {"json": {"params": {"x": 0.5, "n": 2}}}),
        ("POST", "/studies/{study_id}/trials", {"json": imported}),
        ("GET", "/studies/{study_id}/trials", {}),
        ("GET", "/studies/{study_id}/best", {}),
        ("GET", "/studies/{study_id}/best/checkpoint", {}),
        ("GET", "/studies/{study_id}/export.csv", {}),
        ("GET", "/trials/{trial_id}", {}),
        ("GET", "/trials/{trial_id}/lineage", {}),
        ("POST", "/trials/{trial_id}/tell", {"json": {"value": 1.0}}),
        ("POST", "/trials/{trial_id}/metrics", {"json": {"points": [point]}}),
        ("GET", "/trials/{trial_id}/metrics", {}),
        ("GET", "/studies/{study_id}/metrics", {}),
        ("POST", "/trials/{trial_id}/heartbeat", {}),
        ("POST", "/trials/{trial_id}/user_attrs", {"json": {"a": 1}}),
        ("POST", "/trials/{trial_id}/suggest", {"json": suggest}),
        ("GET", "/trials/{trial_id}/checkpoint", {}),
        ("GET", "/dashboard/studies", {}),
        ("GET", "/studies/{study_id}/curves", {}),
        ("GET", "/studies/{study_id}/importance", {}),
        ("GET", "/studies/{study_id}/contour", {"params": {"x": "x", "y": "n"}}),
        ("GET", "/trials/{trial_id}/series", {}),
    ]


def test_a_database_outage_is_503_with_retry_after_and_the_server_recovers(
    pg_server: ServerProcess,
) -> None:
    http = pg_server.http()
    sid = http.post(f"{API}/studies", json=simple_spec("outage")).json()["id"]
    tid = http.post(f"{API}/studies/{sid}/ask").json()["trial_id"]

    routes = every_route(sid, tid)
    documented = {
        (method.upper(), path.removeprefix(API))
        for path, operations in http.get("/openapi.json").json()["paths"].items()
        for method in operations
    }
    # Every route the API documents is asked during the outage (a new one cannot be missed).
    assert {(m, API + p) for m, p, _ in routes} | NO_DATABASE == {
        (m, p if p in ("/livez", "/metrics", "/healthz") else API + p) for m, p in documented
    }

    set_reachable(pg_server.database_url, False)
    try:
        for method, template, kwargs in routes:
            path = template.format(study_id=sid, trial_id=tid)
            r = http.request(method, API + path, **kwargs)
            where = f"{method} {template}"
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
    # nothing queued, imported or set by the refused writes
    assert [t["id"] for t in http.get(f"{API}/studies/{sid}/trials").json()["trials"]] == [tid]
    assert http.get(f"{API}/trials/{tid}").json()["user_attrs"] == {}
    told = http.post(f"{API}/trials/{tid}/tell", json={"value": 1.0})
    assert told.status_code == 200 and told.json()["state"] == "complete"
