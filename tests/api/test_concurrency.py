"""Racing askers over real HTTP: two server processes on one database, many clients each.

No grid point and no slot of ``max_trials`` is ever handed out twice, on SQLite (serialized
writes) and on PostgreSQL (row locks + compare-and-set of the trial number).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, simple_spec

CLIENTS = 12


@pytest.fixture
def two_servers(db_url: str, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    servers = []
    for i in range(2):
        data = tmp_path / f"server{i}"
        data.mkdir()
        proc = ServerProcess(db_url, data, {"HPO_SCHEDULER": "false"})
        proc.token = "shared-token"
        servers.append(proc)
    try:
        for proc in servers:
            proc.start()
        yield servers
    finally:
        for proc in servers:
            proc.stop()


def race(servers: list[ServerProcess], study_id: int) -> list[dict]:
    """CLIENTS threads ask (and tell) until the service says 409; returns every trial handed out."""
    handed: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def worker(i: int) -> None:
        server = servers[i % len(servers)]
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=60
        ) as http:
            start.wait()
            while True:
                r = http.post(f"/api/v1/studies/{study_id}/ask")
                if r.status_code == 409:
                    return
                if r.status_code != 201:
                    errors.append(f"{r.status_code} {r.text}")
                    return
                trial = r.json()
                with lock:
                    handed.append(trial)
                told = http.post(f"/api/v1/trials/{trial['trial_id']}/tell", json={"value": 1.0})
                if told.status_code != 200:
                    errors.append(f"tell {told.status_code} {told.text}")
                    return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return handed


def test_grid_points_are_handed_out_exactly_once(two_servers: list[ServerProcess]) -> None:
    spec = simple_spec(
        "grid-race",
        sampler={"type": "grid"},
        space={
            "a": {"type": "int", "low": 0, "high": 5},
            "b": {"type": "categorical", "choices": ["x", "y", "z", "w"]},
        },
    )
    with two_servers[0].http() as http:
        study_id = http.post("/api/v1/studies", json=spec).json()["id"]
    handed = race(two_servers, study_id)
    points = [(t["params"]["a"], t["params"]["b"]) for t in handed]
    assert len(points) == 24 == len(set(points))
    assert sorted(t["number"] for t in handed) == list(range(24))
    with two_servers[1].http() as http:
        study = http.get(f"/api/v1/studies/{study_id}").json()
        assert study["state"] == "completed"
        assert study["counts"]["complete"] == 24 and study["n_trials"] == 24
        answer = http.post(f"/api/v1/studies/{study_id}/ask")
        assert answer.status_code == 409 and "exhausted" in answer.json()["message"]


def test_last_budget_slots_are_never_exceeded(two_servers: list[ServerProcess]) -> None:
    spec = simple_spec("budget-race", budget={"max_trials": 17})
    with two_servers[0].http() as http:
        study_id = http.post("/api/v1/studies", json=spec).json()["id"]
    handed = race(two_servers, study_id)
    assert len(handed) == 17
    assert sorted(t["number"] for t in handed) == list(range(17))
    assert len({t["trial_id"] for t in handed}) == 17
    with two_servers[1].http() as http:
        trials = http.get(f"/api/v1/studies/{study_id}/trials").json()["trials"]
        assert len(trials) == 17


def test_concurrency_limit_holds_under_racing_asks(two_servers: list[ServerProcess]) -> None:
    spec = simple_spec("slots", budget={"max_concurrent": 3})
    with two_servers[0].http() as http:
        study_id = http.post("/api/v1/studies", json=spec).json()["id"]
    granted: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def worker(i: int) -> None:
        server = two_servers[i % 2]
        with server.http() as http:
            start.wait()
            r = http.post(f"/api/v1/studies/{study_id}/ask")
            if r.status_code == 201:
                with lock:
                    granted.append(r.json()["trial_id"])
            else:
                assert r.status_code == 409, r.text
                assert "max_concurrent" in r.json()["message"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(granted) == 3


def test_max_steps_is_never_exceeded_by_racing_reports(two_servers: list[ServerProcess]) -> None:
    """CLIENTS trials on two servers report steps of two points at once until told to stop;
    ``budget.max_steps`` (steps summed over trials) is spent exactly: no point past it is
    stored, none within it is refused, and the study completes saying why."""
    max_steps = 100
    spec = simple_spec("steps-race", budget={"max_trials": CLIENTS, "max_steps": max_steps})
    with two_servers[0].http() as http:
        study_id = http.post("/api/v1/studies", json=spec).json()["id"]
    errors: list[str] = []
    start = threading.Barrier(CLIENTS, timeout=120)

    def worker(i: int) -> None:
        with two_servers[i % 2].http() as http:
            asked = http.post(f"/api/v1/studies/{study_id}/ask")
            if asked.status_code != 201:
                errors.append(f"ask {asked.status_code} {asked.text}")
                start.abort()
                return
            trial = asked.json()
            start.wait()
            for step in range(1, 40, 2):
                points = [{"name": "loss", "step": s, "value": 1.0 / s} for s in (step, step + 1)]
                r = http.post(
                    f"/api/v1/trials/{trial['trial_id']}/metrics", json={"points": points}
                )
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text}")
                    return
                if r.json()["should_stop"]:
                    return
            errors.append(f"trial {trial['trial_id']} was never stopped")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    with two_servers[1].http() as http:
        trials = http.get(f"/api/v1/studies/{study_id}/trials").json()["trials"]
        stored = 0
        for trial in trials:
            points = http.get(f"/api/v1/trials/{trial['id']}/metrics").json()["points"]
            steps = [p["step"] for p in points]
            assert steps == list(range(1, len(steps) + 1)), steps  # none skipped or twice
            # (a trial stopped before it stored a step has no last step)
            assert (trial["last_step"] or 0) == len(steps) and trial["state"] == "pruned"
            stored += len(steps)
        assert stored == max_steps
        study = http.get(f"/api/v1/studies/{study_id}").json()
        assert study["state"] == "completed", study
        assert "budget.max_steps" in study["state_reason"], study
