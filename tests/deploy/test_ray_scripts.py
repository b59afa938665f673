"""deploy/ray/start-cluster.sh and join-cluster.sh, run unchanged on one host as a two-node
cluster (two raylets, own ports and temp dirs) from a fresh HOME: the head creates the Ray
token, the joining node uses it, hpo serve comes up behind them and runs a study whose two
ranks only fit on two different nodes; SIGTERM to the scripts stops everything they started."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from hpo.api.client import Client
from hpo.api.demo import free_port
from tests.conftest import wait_for
from tests.deploy.conftest import (
    DEPLOY,
    Marked,
    node_args,
    ray_errors,
    ray_node_count,
    remove,
    short_temp_dir,
    token_path,
    write_spec,
)

pytestmark = pytest.mark.ray


def start(script: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(DEPLOY / "ray" / script)],
        env=env,
        cwd=log.parent,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_start_and_join_scripts_run_a_study_on_two_nodes(tmp_path: Path, marked: Marked) -> None:
    temps = [short_temp_dir("hpo-head-"), short_temp_dir("hpo-node-")]
    ray_port, serve_port = free_port(), free_port()
    head_env = {
        **marked.env,
        "HPO_DATABASE_URL": f"sqlite:///{tmp_path / 'hpo.db'}",
        "HPO_STORAGE_PATH": str(tmp_path / "checkpoints"),
        "HPO_DATA_DIR": str(tmp_path / "data"),
        "HPO_TOKEN": "api-token-for-the-test",
        "HPO_RAY_PORT": str(ray_port),
        "HEAD_IP": "127.0.0.1",
        # an address of its own (not 127.0.0.1: the script asked there whether it was up)
        "HPO_HOST": "127.0.0.2",
        "HPO_PUBLIC_URL": f"http://127.0.0.2:{serve_port}",
        "HPO_PORT": str(serve_port),
        "HPO_RAY_MIN_NODES": "2",  # hpo serve starts once the other node has joined
        "HPO_RAY_START_ARGS": node_args(temps[0], head=True),
        "HPO_READY_TIMEOUT_S": "120",
        "HPO_SCHEDULER_INTERVAL_S": "0.5",
    }
    node_env = {
        **marked.env,
        "HPO_RAY_HEAD": f"127.0.0.1:{ray_port}",
        "HPO_NODE_IP": "127.0.0.1",
        "HPO_STORAGE_PATH": head_env["HPO_STORAGE_PATH"],  # checked to be the head's
        "HPO_RAY_START_ARGS": node_args(temps[1], head=False),
        "HPO_READY_TIMEOUT_S": "120",
    }
    logs = [tmp_path / "head.log", tmp_path / "node.log"]
    procs: list[subprocess.Popen] = []

    def output() -> str:
        texts = [p.read_text()[-4000:] for p in logs if p.exists()]
        texts += [p.read_text()[-3000:] for p in sorted((tmp_path / "hpo-logs").glob("*.log"))]
        texts.append(ray_errors(*temps))
        return "\n---\n".join(texts)

    try:
        procs.append(start("start-cluster.sh", head_env, logs[0]))
        token = token_path(marked.home)
        wait_for(token.exists, 60, "the head to create the Ray token")
        procs.append(start("join-cluster.sh", node_env, logs[1]))

        def healthy() -> bool:
            for proc in procs:
                assert proc.poll() is None, output()
            try:
                return httpx.get(f"http://127.0.0.2:{serve_port}/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 240, "hpo serve behind the two-node cluster")
        # and the head's script saw it come up (it asked 127.0.0.1 and waited out its deadline)
        wait_for(lambda: "ready: API at" in logs[0].read_text(), 60, "the head script's ready")
        assert token.stat().st_mode & 0o777 == 0o600
        ray_env = {**marked.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        assert ray_node_count(f"127.0.0.1:{ray_port}", ray_env) == 2

        client = Client(f"http://127.0.0.2:{serve_port}", "api-token-for-the-test")
        study = client.create_study(write_spec(tmp_path / "study.yaml", "ray-scripts"))
        wait_for(lambda: study.state == "completed", 180, "the study")
        assert [t.state for t in study.trials()] == ["complete"], output()

        for proc in reversed(procs):  # as an operator would: workers first, then the head
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) != 0  # the scripts never exit 0: they supervise
        assert marked.processes() == {}, "processes the scripts started are still running"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        remove(*temps)


def test_join_fails_loudly_without_the_token(tmp_path: Path, marked: Marked) -> None:
    env = {**marked.env, "HPO_RAY_HEAD": f"127.0.0.1:{free_port()}"}
    log = tmp_path / "node.log"
    proc = start("join-cluster.sh", env, log)
    assert proc.wait(timeout=60) != 0
    assert "no Ray auth token" in log.read_text()
    assert not token_path(marked.home).exists()  # a token of its own would not match


def test_join_refuses_storage_the_head_does_not_share(tmp_path: Path, marked: Marked) -> None:
    token = token_path(marked.home)
    token.parent.mkdir()
    token.write_text("0" * 64)
    token.chmod(0o600)
    elsewhere = tmp_path / "node-local-checkpoints"
    elsewhere.mkdir()
    env = {
        **marked.env,
        "HPO_RAY_HEAD": f"127.0.0.1:{free_port()}",
        "HPO_STORAGE_PATH": str(elsewhere),
    }
    log = tmp_path / "node.log"
    proc = start("join-cluster.sh", env, log)
    assert proc.wait(timeout=60) != 0
    assert "is not the head's shared storage" in log.read_text()
    assert marked.processes() == {}


def test_start_refuses_a_token_others_can_read(tmp_path: Path, marked: Marked) -> None:
    token = token_path(marked.home)
    token.parent.mkdir()
    token.write_text("0" * 64)
    token.chmod(0o644)
    env = {
        **marked.env,
        "HPO_DATABASE_URL": f"sqlite:///{tmp_path / 'hpo.db'}",
        "HPO_STORAGE_PATH": str(tmp_path / "checkpoints"),
        "HPO_TOKEN": "t",
    }
    log = tmp_path / "head.log"
    proc = start("start-cluster.sh", env, log)
    assert proc.wait(timeout=60) != 0
    assert "has mode 644" in log.read_text()
    assert marked.processes() == {}
