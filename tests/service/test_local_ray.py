"""A local Ray session's processes: recorded, reaped once their server is gone and only then,
and started without the control plane's secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from hpo.service import local_ray
from hpo.service.executor import control_plane_secrets


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _session(path: Path, owner: dict, procs: list[subprocess.Popen]) -> None:
    entries = [{"pid": p.pid, "started": psutil.Process(p.pid).create_time()} for p in procs]
    path.write_text(json.dumps({"owner": owner, "processes": entries}))


def test_leftovers_of_a_dead_server_are_reaped(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = {"pid": dead.pid, "started": psutil.Process(dead.pid).create_time()}
    dead.wait()
    left, bystander = _sleeper(), _sleeper()
    try:
        path = tmp_path / "ray-session.json"
        _session(path, owner, [left])
        assert local_ray.reap_leftovers(path, grace_s=5) == 1
        assert left.wait(timeout=10) is not None
        assert bystander.poll() is None  # not recorded: never touched
        assert not path.exists()
    finally:
        for proc in (left, bystander):
            proc.kill()
            proc.wait()


def test_a_live_servers_session_and_reused_pids_are_left_alone(tmp_path: Path) -> None:
    me = psutil.Process()
    running = _sleeper()
    try:
        path = tmp_path / "ray-session.json"
        _session(path, {"pid": me.pid, "started": me.create_time()}, [running])
        assert local_ray.reap_leftovers(path) == 0  # its owner still runs
        # a recorded pid whose start time differs is another process now
        entry = {"pid": running.pid, "started": 1.0}
        path.write_text(json.dumps({"owner": {"pid": 1, "started": 0.0}, "processes": [entry]}))
        assert local_ray.reap_leftovers(path) == 0
        assert running.poll() is None
    finally:
        running.kill()
        running.wait()


def test_record_lists_this_process_and_its_children(tmp_path: Path) -> None:
    child = _sleeper()
    try:
        path = tmp_path / "ray-session.json"
        assert local_ray.record(path) >= 1
        body = json.loads(path.read_text())
        assert body["owner"]["pid"] == os.getpid()
        assert child.pid in [p["pid"] for p in body["processes"]]
    finally:
        child.kill()
        child.wait()


def test_processes_started_in_a_scrubbed_environment_see_no_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HPO_TOKEN", "admin-secret")
    monkeypatch.setenv("HPO_DATABASE_URL", "postgresql://u:pw@db/hpo")
    monkeypatch.setenv("PGPASSWORD", "pw")
    monkeypatch.setenv("HPO_EXTRA_TRAINABLES", "tests.trainables")
    with local_ray.scrubbed_environ() as removed:
        out = subprocess.run(
            [sys.executable, "-c", "import os; print(sorted(os.environ))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    assert {"HPO_TOKEN", "HPO_DATABASE_URL", "PGPASSWORD"} <= set(removed)
    for name in ("HPO_TOKEN", "HPO_DATABASE_URL", "PGPASSWORD"):
        assert f"'{name}'" not in out
    assert "'HPO_EXTRA_TRAINABLES'" in out
    assert os.environ["HPO_TOKEN"] == "admin-secret"  # the server keeps its own
    assert control_plane_secrets({"HPO_RAY_NAMESPACE": "x", "HPO_TOKEN": "t"}) == ["HPO_TOKEN"]
