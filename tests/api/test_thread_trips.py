"""The routes a dashboard polls and a trial reports to make one trip to a thread each: the
polled ones in their own pool of 4 threads, reports in one of 8, heartbeats in FastAPI's; a
study poll whose ETag is current, none (hpo.service.storage.seqs).

FastAPI runs a plain ``def`` dependency, and the validation of a sync route's returned model,
in the thread pool. With the auth and storage dependencies as plain functions, a study poll
made four such trips; under 200 polling pages each trip queued behind the others' database
reads (160 ms a request at the server: docs/benchmarks.md). This counts the trips of each hot
request through the real app, and the pool each went to (hpo.api.pools), so a new sync
dependency, a route that returns a model again, or a polled route back in the default pool of
40 threads shows up here, not only as a slower benchmark.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from fastapi.testclient import TestClient

from hpo.api.app import create_app
from hpo.api.pools import ASKS, DEFAULT, POLLS, REPORTS, Pool
from hpo.service.settings import Settings
from tests.conftest import simple_spec

API = "/api/v1"


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """What this process hands a thread, by function name; and by pool, as ``pool:<threads>``
    (``pool:default`` for FastAPI's own)."""
    counted: Counter[str] = Counter()
    run_sync = anyio.to_thread.run_sync

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        inner = func
        while hasattr(inner, "func"):  # functools.partial
            inner = inner.func
        counted[getattr(inner, "__qualname__", repr(inner))] += 1
        limiter = kwargs.get("limiter")
        counted[f"pool:{limiter.total_tokens if limiter else 'default'}"] += 1
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    return counted


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'hpo.db'}",
        data_dir=tmp_path,
        token="t0ken",
        scheduler=False,
    )
    with TestClient(create_app(settings), headers={"Authorization": "Bearer t0ken"}) as client:
        yield client


def test_polls_and_reports_make_one_trip_to_the_thread_pool(
    client: TestClient, trips: Counter[str]
) -> None:
    sid = client.post(f"{API}/studies", json=simple_spec()).json()["id"]
    trips.clear()
    asked = client.post(f"{API}/studies/{sid}/ask").json()
    assert trips[f"pool:{ASKS.threads}"] == 1 and trips["pool:default"] == 0, dict(trips)
    tid, token = asked["trial_id"], asked["attempt_token"]
    points = {"points": [{"step": 1, "name": "loss", "value": 0.5}]}
    assert client.post(f"{API}/trials/{tid}/metrics", json=points).json() == {"should_stop": False}

    def one(method: str, path: str, pool: Pool | None, *, expect: int = 1, **kwargs: Any) -> Any:
        trips.clear()
        answer = client.request(method, path, **kwargs)
        assert answer.status_code in (200, 304), answer.text
        on_threads = sum(n for name, n in trips.items() if not name.startswith("pool:"))
        assert on_threads == expect, (path, dict(trips))
        assert trips[f"pool:{pool.threads if pool else 'default'}"] == expect, (path, dict(trips))
        return answer

    study = one("GET", f"{API}/studies/{sid}", POLLS)
    assert study.json()["id"] == sid
    # the study's seq, just read, answers its ETag check on the event loop: no trip
    tagged = {"If-None-Match": study.headers["etag"]}
    assert one("GET", f"{API}/studies/{sid}", POLLS, headers=tagged, expect=0).status_code == 304
    page = one("GET", f"{API}/studies/{sid}/trials", POLLS)
    assert [t["id"] for t in page.json()["trials"]] == [tid]
    unchanged = {"If-None-Match": page.headers["etag"]}
    one("GET", f"{API}/studies/{sid}/trials", POLLS, headers=unchanged)
    curves = one("GET", f"{API}/studies/{sid}/curves", POLLS)
    assert curves.json()["series"][0]["values"] == [0.5]
    unchanged = {"If-None-Match": curves.headers["etag"]}
    one("GET", f"{API}/studies/{sid}/curves", POLLS, headers=unchanged)
    by_attempt = {"Authorization": f"Bearer {token}"}
    # An attempt token's first request checks it in the database; the next ones within
    # ATTEMPT_VERIFIED_S do not (the write itself is fenced in its own transaction).
    report = f"{API}/trials/{tid}/metrics"
    assert REPORTS.threads not in (POLLS.threads, ASKS.threads)  # told apart by their size
    trips.clear()
    first = client.post(report, json=points, headers=by_attempt)
    # the token's check in FastAPI's pool, the report in its own
    assert trips["Storage.attempt_matches"] == 1 and trips["pool:default"] == 1, dict(trips)
    assert trips[f"pool:{REPORTS.threads}"] == 1 and trips["report"] == 1, dict(trips)
    assert first.json() == {"should_stop": False}
    reported = one("POST", f"{API}/trials/{tid}/metrics", REPORTS, json=points, headers=by_attempt)
    assert reported.json() == {"should_stop": False}
    forged = {"Authorization": f"Bearer {token[:-4]}AAAA"}  # its trial and attempt, wrong secret
    for _ in range(2):  # a wrong token is never remembered
        trips.clear()
        answer = client.post(f"{API}/trials/{tid}/metrics", json=points, headers=forged)
        assert answer.status_code == 401, answer.text
        assert trips["Storage.attempt_matches"] == 1
    beat = one("POST", f"{API}/trials/{tid}/heartbeat", DEFAULT, headers=by_attempt)
    assert beat.json() == {"should_stop": False}
    # reports left the study's seq known; a change of the study forgets it: read again, 200
    one("GET", f"{API}/studies/{sid}", POLLS, headers=tagged, expect=0)
    assert client.patch(f"{API}/studies/{sid}", json={"state": "paused"}).status_code == 200
    changed = one("GET", f"{API}/studies/{sid}", POLLS, headers=tagged)
    assert changed.status_code == 200 and changed.json()["state"] == "paused"


def test_a_superseded_attempt_token_is_refused_on_every_route_right_after_it_was_used(
    client: TestClient,
) -> None:
    """Remembering a current token (for reports and heartbeats) must not let it through once
    its attempt is superseded: used a moment before, on every route it may call, it is a 409
    and stores nothing, as when every request read the database."""
    spec = simple_spec(max_retries=2)
    sid = client.post(f"{API}/studies", json=spec).json()["id"]
    asked = client.post(f"{API}/studies/{sid}/ask").json()
    tid, old = asked["trial_id"], {"Authorization": f"Bearer {asked['attempt_token']}"}
    point = {"points": [{"step": 1, "name": "loss", "value": 1.0}]}
    assert client.post(f"{API}/trials/{tid}/metrics", json=point, headers=old).status_code == 200
    assert client.post(f"{API}/trials/{tid}/heartbeat", headers=old).status_code == 200
    client.app.state.service.fail_attempt(tid, "lost", failure_class="infrastructure")
    again = client.post(f"{API}/studies/{sid}/ask").json()
    assert again["trial_id"] == tid and again["attempt_token"].startswith(f"hpo_att.{tid}.2.")
    calls = [
        (
            "POST",
            f"/trials/{tid}/metrics",
            {"json": {"points": [{"step": 2, "name": "loss", "value": 2.0}]}},
        ),
        ("POST", f"/trials/{tid}/heartbeat", {}),
        ("POST", f"/trials/{tid}/user_attrs", {"json": {"stale": "yes"}}),
        (
            "POST",
            f"/trials/{tid}/suggest",
            {"json": {"name": "y", "param": {"type": "float", "low": 0, "high": 1}}},
        ),
        ("POST", f"/trials/{tid}/tell", {"json": {"value": 1.0}}),
        ("GET", f"/trials/{tid}", {}),
        ("GET", f"/trials/{tid}/metrics", {}),
    ]
    for method, path, kwargs in calls:
        answer = client.request(method, API + path, headers=old, **kwargs)
        assert answer.status_code == 409, (path, answer.status_code, answer.text)
    trial = client.get(f"{API}/trials/{tid}").json()
    assert trial["state"] == "running" and trial["attempts"] == 2
    assert trial.get("user_attrs", {}).get("stale") is None
    points = client.get(f"{API}/trials/{tid}/metrics").json()["points"]
    assert [p["step"] for p in points] == [1]


def test_asks_waiting_for_their_studys_turn_hold_no_thread_another_study_needs(
    client: TestClient,
) -> None:
    """One study's asks wait for its turn (here: its first ask is held, as by a slow fit) on
    the event loop, not in the asks' pool of 4 threads: another study's ask is answered
    meanwhile, and the held ones all get their trials once the turn frees."""
    held, other = (client.post(f"{API}/studies", json=simple_spec(n)).json()["id"] for n in "ab")
    turn = client.app.state.service._asking(held)
    turn.acquire()  # the study's first ask waits inside StudyService.ask, in a pool thread
    answers: list[int] = []
    waiting = [
        threading.Thread(
            target=lambda: answers.append(client.post(f"{API}/studies/{held}/ask").status_code)
        )
        for _ in range(ASKS.threads + 2)
    ]
    for t in waiting:
        t.start()
    time.sleep(0.5)  # all of them asked
    done: list[int] = []
    free = threading.Thread(
        target=lambda: done.append(client.post(f"{API}/studies/{other}/ask").status_code)
    )
    free.start()
    free.join(20)
    assert done == [201] and answers == []  # answered while the held study's asks all wait
    turn.release()
    for t in waiting:
        t.join(30)
    assert answers == [201] * (ASKS.threads + 2)
