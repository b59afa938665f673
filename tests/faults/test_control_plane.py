"""Drills on the control plane with real processes (``hpo serve`` subprocesses, a local Ray):
a second server on the same database, a killed server, a deterministic error, a trial that
hangs while it heartbeats, a study out of time, and what a rank process can see.

Each drill counts what matters: trials lost 0, duplicated 0, wrongly failed 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from hpo.api.client import Study
from tests.conftest import ServerProcess, create_pg_database, drop_pg_database, wait_for

pytestmark = pytest.mark.ray

RAY_ENV = {"HPO_RAY_NUM_CPUS": "2", "HPO_SCHEDULER_INTERVAL_S": "0.5"}


def serve(tmp: Path, database: Path, **env: str) -> ServerProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(f"sqlite:///{database}", tmp, {**RAY_ENV, **env})
    server.start()
    return server


def synthetic(name: str, config: dict, **over: object) -> dict:
    spec: dict = {
        "name": name,
        "objective": {"metric": "loss", "direction": "minimize"},
        "sampler": {"type": "random", "seed": 0},
        "budget": {"max_trials": 1},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "trainable": {"name": "synthetic", "config": config},
        "space": {"x": {"type": "float", "low": -1, "high": 1}},
        "lease_s": 60,
    }
    spec.update(over)
    return spec


def ended(study: Study, timeout: float = 120) -> None:
    wait_for(lambda: study.state in ("completed", "stopped"), timeout, f"study {study.name}")


def health(server: ServerProcess) -> dict:
    return httpx.get(server.url + "/healthz", timeout=10).json()


def gone(pids: list[int]) -> bool:
    """Whether none of ``pids`` runs a rank any more: each was killed (zombies count) or is
    back in Ray's worker pool (titled ``ray::IDLE``, no longer ``ray::trial-...``)."""
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE and "trial-" in " ".join(proc.cmdline()):
                return False
    return True


def rank_pids(server: ServerProcess, trial_id: int) -> list[int]:
    placement = server.client().trial(trial_id).placement or {}
    return [rank["pid"] for rank in placement.get("ranks", [])]


def test_a_second_server_on_the_same_sqlite_database_serves_the_api_only(tmp_path: Path) -> None:
    database = tmp_path / "hpo.db"
    first = serve(tmp_path / "first", database)
    second = None
    try:
        study = first.client().create_study(
            synthetic("shared", {"steps": 12, "step_s": 0.4}, budget={"max_trials": 2})
        )
        wait_for(lambda: study.trials(state="running"), 60, "a running trial")
        second = serve(tmp_path / "second", database)
        log = second.log_path
        wait_for(lambda: "serves the API only" in log.read_text(), 30, "the second's message")
        assert "another hpo serve" in log.read_text()
        assert health(first)["scheduler"] == "running"
        assert health(second)["scheduler"] == "standby"
        # the second server answers the API, on the same data
        assert second.client().study(study.id).refresh().counts["running"] >= 1
        ended(study)
        trials = [first.client().trial(t.id) for t in study.trials()]
        assert sorted(t.number for t in trials) == [0, 1]  # lost 0, duplicated 0
        assert [t.state for t in trials] == ["complete", "complete"]  # wrongly failed 0
        assert [t.attempts for t in trials] == [1, 1]
        assert "launched trial" not in log.read_text()
        first.stop()  # a clean stop hands the scheduler lease over at once
        wait_for(lambda: health(second)["scheduler"] == "running", 30, "the hand-over")
    finally:
        if second is not None:
            second.stop()
        first.stop()


def test_a_killed_control_plane_costs_no_retry_and_leaves_no_ray_processes(
    tmp_path: Path,
) -> None:
    server = serve(tmp_path, tmp_path / "hpo.db")
    old_group = None
    try:
        study = server.client().create_study(
            synthetic("crash", {"steps": 10, "step_s": 0.4}, budget={"max_trials": 2})
        )  # max_retries: 0
        first = wait_for(lambda: study.trials(state="running"), 60, "a running trial")[0]
        wait_for(lambda: rank_pids(server, first.id), 60, "its rank to start")
        session = json.loads((tmp_path / "ray-session.json").read_text())
        recorded = [p["pid"] for p in session["processes"]]
        assert recorded, "the local Ray session's processes are recorded"
        assert server.proc is not None
        old_group = os.getpgid(server.proc.pid)
        os.kill(server.proc.pid, signal.SIGKILL)  # the server only: Ray's processes stay
        server.proc.wait(timeout=30)
        server.start()
        ended(study, timeout=150)
        wait_for(lambda: gone(recorded), 30, "the old Ray session's processes to be reaped")
        client = server.client()
        trials = [client.trial(t.id) for t in study.trials()]
        assert sorted(t.number for t in trials) == [0, 1]  # lost 0, duplicated 0
        assert [t.state for t in trials] == ["complete", "complete"]  # wrongly failed 0
        crashed = client.trial(first.id)
        assert crashed.attempts == 2
        losses = [e.detail for e in crashed.events if e.state == "failed"]
        assert len(losses) == 1 and losses[0].startswith("[infrastructure] attempt 1:")
        assert "control plane restarted" in losses[0]
    finally:
        server.stop()
        if old_group is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(old_group, signal.SIGKILL)


def test_a_standby_on_postgresql_takes_over_when_the_leader_dies(
    tmp_path: Path, pg_available: bool
) -> None:
    if not pg_available:
        pytest.skip("PostgreSQL is not reachable")
    url = create_pg_database()
    shared = {"HPO_SCHEDULER_LEASE_S": "4", "HPO_STORAGE_PATH": str(tmp_path / "checkpoints")}
    servers = []
    try:
        for name in ("leader", "standby"):
            (tmp_path / name).mkdir()
            server = ServerProcess(url, tmp_path / name, {**RAY_ENV, **shared})
            server.start()
            servers.append(server)
        leader, standby = servers
        wait_for(lambda: health(leader)["scheduler"] == "running", 30, "the leader")
        assert health(standby)["scheduler"] == "standby"
        study = standby.client().create_study(  # any server takes API calls
            synthetic("failover", {"steps": 10, "step_s": 0.4}, budget={"max_trials": 2})
        )
        first = wait_for(lambda: study.trials(state="running"), 60, "a running trial")[0]
        wait_for(lambda: rank_pids(standby, first.id), 60, "its rank to start")
        leader.kill()  # kill -9 of the leader and its local Ray
        killed = time.monotonic()
        wait_for(lambda: health(standby)["scheduler"] == "running", 30, "the take-over")
        # within the lease (4 s), plus the standby's look at it (every lease_s / 3, 1.3 s),
        # this poll's (0.25 s) and slack for a loaded machine
        took = time.monotonic() - killed
        assert took <= 4 + 3, f"the standby took over {took:.1f} s after the leader died"
        ended(study, timeout=120)
        client = standby.client()
        trials = [client.trial(t.id) for t in study.trials()]
        assert sorted(t.number for t in trials) == [0, 1]  # lost 0, duplicated 0
        assert [t.state for t in trials] == ["complete", "complete"]  # wrongly failed 0
        crashed = client.trial(first.id)
        assert crashed.attempts == 2  # max_retries 0: the loss spent no retry
        (loss,) = [e.detail for e in crashed.events if e.state == "failed"]
        assert loss.startswith("[infrastructure] attempt 1:")
    finally:
        for server in servers:
            server.stop()
        drop_pg_database(url)


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("control-plane")
    server = serve(tmp, tmp / "hpo.db")
    try:
        yield server
    finally:
        server.stop()


def test_a_deterministic_error_is_not_retried(ray_server: ServerProcess) -> None:
    client = ray_server.client()
    study = client.create_study(
        synthetic(
            "diverges",
            {"steps": 3},
            max_retries=2,
            space={"x": {"type": "categorical", "choices": [1e308]}},
        )
    )
    ended(study)
    trial = client.trial(study.trials()[0].id)
    assert (trial.state, trial.attempts) == ("failed", 1)
    assert "training diverged" in trial.error
    (event,) = [e for e in trial.events if e.state == "failed"]
    assert event.detail.startswith("[deterministic] attempt 1:")


def test_a_stalled_trial_that_heartbeats_fails_for_no_progress(ray_server: ServerProcess) -> None:
    client = ray_server.client()
    study = client.create_study(
        synthetic(
            "stalled",
            {"steps": 50, "step_s": 0.1, "stall_at_step": 3},
            progress_timeout_s=3,
        )
    )
    running = wait_for(lambda: study.trials(state="running"), 60, "a running trial")[0]
    pids = wait_for(lambda: rank_pids(ray_server, running.id), 60, "its rank to start")
    ended(study, timeout=60)
    trial = client.trial(running.id)
    assert (trial.state, trial.attempts) == ("failed", 1)
    assert trial.error.startswith("no progress")
    assert [p.step for p in study.metrics(trial.id, "loss")] == [1, 2]
    wait_for(lambda: gone(pids), 30, "the stalled rank to be cancelled")


def test_the_study_timeout_cancels_a_running_trial(ray_server: ServerProcess) -> None:
    client = ray_server.client()
    created = time.monotonic()
    study = client.create_study(  # the time counts from here: room for a cold Ray start
        synthetic(
            "out-of-time",
            {"steps": 1000, "step_s": 0.1},
            budget={"max_trials": 1, "timeout_s": 20},
        )
    )
    running = wait_for(lambda: study.trials(state="running"), 20, "a running trial")[0]
    pids = wait_for(lambda: rank_pids(ray_server, running.id), 20, "its rank to start")
    ended(study, timeout=60)
    assert time.monotonic() - created < 20 + 10  # the sweep ends it promptly
    record = study.refresh()
    assert record.state == "completed" and record.state_reason == "budget.timeout_s reached"
    trial = client.trial(running.id)
    assert trial.state == "failed" and "timeout_s" in trial.error
    assert len(study.metrics(trial.id, "loss")) < 1000  # it was cut short
    wait_for(lambda: gone(pids), 30, "the running rank to be cancelled")


def test_rank_processes_hold_no_admin_token_and_no_database_url(
    ray_server: ServerProcess,
) -> None:
    client = ray_server.client()
    study = client.create_study(synthetic("environment", {"steps": 2, "report_secrets": True}))
    ended(study)
    trial = client.trial(study.trials()[0].id)
    assert trial.state == "complete"
    seen = [p.value for p in study.metrics(trial.id, "secrets_seen")]
    assert seen == [0.0, 0.0]
    # nor any process of the local Ray (raylet, GCS, agents, workers) that the server started
    assert ray_server.proc is not None
    server = psutil.Process(ray_server.proc.pid)
    assert "HPO_TOKEN" in server.environ()  # the server itself has them...
    leaked = []
    for proc in server.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            env = proc.environ()
            if "HPO_TOKEN" in env or "HPO_DATABASE_URL" in env:
                leaked.append(proc.name())
    assert leaked == []  # ...no process under it does
