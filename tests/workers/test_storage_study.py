"""End to end with checkpoints on S3: ``hpo serve`` (a subprocess, real HTTP) with a local Ray
and ``HPO_STORAGE_PATH=s3://bucket/prefix`` on the test's moto server. A DDP trial whose
rank 0 is killed resumes its next attempt from the checkpoint in the bucket (both ranks read
it from there), the checkpoint downloads as an archive, and the best trial's test evaluation
reads it back; nothing is written to a local checkpoint folder."""

from __future__ import annotations

import io
import json
import secrets
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, wait_for
from tests.workers.conftest import S3Server

pytestmark = pytest.mark.ray


def test_a_killed_trial_resumes_from_s3_and_its_checkpoint_downloads_and_evaluates(
    s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.new_bucket()
    secret = f"hpo-secret-{secrets.token_hex(8)}"  # moto takes any credentials
    ray_dir = Path(tempfile.mkdtemp(prefix="hpo-ray-", dir="/tmp"))  # short: Ray's socket paths
    env = {
        **s3_server.env,
        "AWS_SECRET_ACCESS_KEY": secret,
        "RAY_TMPDIR": str(ray_dir),
        "HPO_STORAGE_PATH": f"s3://{bucket}/hpo",
        "HPO_RAY_NUM_CPUS": "2",
        "HPO_SCHEDULER_INTERVAL_S": "0.5",
    }
    server = ServerProcess(f"sqlite:///{tmp_path / 'hpo.db'}", tmp_path, env)
    server.start()
    try:
        study = server.client().create_study(
            {
                "name": "on-s3",
                "objective": {"metric": "loss", "direction": "minimize"},
                "sampler": {"type": "random", "seed": 0},
                "budget": {"max_trials": 1},
                "max_retries": 1,
                "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
                # rank 0 is killed (SIGKILL) at step 3 of attempt 1, after checkpoint 2
                "trainable": {"name": "synthetic", "config": {"steps": 4, "fail_at_step": 3}},
                "space": {"x": {"type": "float", "low": -1, "high": 1}},
            }
        )
        wait_for(
            lambda: study.state == "completed" and study.best_trial.test_metrics,
            240,
            "the study to complete and its best trial to be evaluated",
        )
        best = study.best_trial
        with server.http() as http:
            trial = http.get(f"/api/v1/trials/{best.id}").json()
            points = http.get(f"/api/v1/trials/{best.id}/metrics", params={"name": "loss"})
            archive = http.get(f"/api/v1/trials/{best.id}/checkpoint")
            deployment = http.get("/livez").json()["deployment"]
    finally:
        server.stop()
    assert trial["state"] == "complete" and trial["attempts"] == 2
    # Steps 1-2 are attempt 1's; attempt 2 resumed from checkpoint 2 in the bucket and ran
    # 3-4 (starting from scratch would have made every step attempt 2's).
    curve = [(p["step"], p["attempt"]) for p in points.json()["points"]]
    assert curve == [(1, 1), (2, 1), (3, 2), (4, 2)]
    trial_prefix = f"{bucket}/hpo/deployment-{deployment}/study-{study.id}/trial-{best.id}"
    stored = sorted(s3_server.filesystem().find(trial_prefix))
    assert stored == [
        f"{trial_prefix}/attempt-{attempt}/checkpoint-00000{step}/{name}"
        for attempt, step in ((1, 1), (1, 2), (2, 3), (2, 4))
        for name in ("meta.json", "state.pt")
    ]
    assert not (tmp_path / "checkpoints").exists()

    assert archive.status_code == 200, archive.text
    assert archive.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        assert sorted(tar.getnames()) == [
            "checkpoint-000004",
            "checkpoint-000004/meta.json",
            "checkpoint-000004/state.pt",
        ]
        meta = json.load(tar.extractfile("checkpoint-000004/meta.json"))
    assert (meta["step"], meta["attempt"], meta["trial_id"]) == (4, 2, best.id)
    # evaluate() ran on Ray against the checkpoint downloaded from the bucket
    assert best.test_metrics == {"test_loss": best.value, "test_step": 4.0}
    # The store's credentials reached ranks, evaluation and preflight as task arguments:
    # nowhere in Ray's files (its runtime_env_agent.log prints every runtime_env in full).
    logs = [p for p in ray_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "runtime_env_agent.log" for p in logs)
    assert [p for p in logs if secret.encode() in p.read_bytes()] == []
    shutil.rmtree(ray_dir, ignore_errors=True)
