"""deploy/slurm/hpo-study.sbatch, run unchanged by bash with stand-in ``srun``/``scontrol``
(tests/deploy/data/bin) first on PATH: two "nodes" on this host, each a raylet with its own
ports and temp dir, a fresh HOME (no Ray token yet), a real ``hpo serve`` and a real study."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from hpo.api.client import Client
from hpo.api.demo import free_port
from hpo.service.errors import HpoError
from tests.conftest import wait_for
from tests.deploy.conftest import (
    DEPLOY,
    STAND_INS,
    Marked,
    node_args,
    ray_errors,
    remove,
    short_temp_dir,
    token_path,
    write_spec,
)

pytestmark = pytest.mark.ray

SBATCH = DEPLOY / "slurm" / "hpo-study.sbatch"
NODES = ("fake-a", "fake-b")


class Job:
    """One run of the sbatch script: its environment, its stand-in nodes, its outputs."""

    def __init__(self, tmp_path: Path, marked: Marked) -> None:
        self.id = "4242"
        self.submit_dir = tmp_path / "submit"
        self.submit_dir.mkdir()
        self.slurm_dir = tmp_path / "slurm"
        self.slurm_dir.mkdir()
        self.temp_dirs = [short_temp_dir(f"hpo-{node}-") for node in NODES]
        for node, temp in zip(NODES, self.temp_dirs, strict=True):
            args = node_args(temp, head=node == NODES[0])
            (self.slurm_dir / f"{node}.env").write_text(f"export HPO_RAY_NODE_ARGS='{args}'\n")
        self.port = free_port()
        self.token = "api-token-for-the-test"
        self.env = {
            **marked.env,
            "PATH": f"{STAND_INS}:{marked.env['PATH']}",
            "FAKE_SLURM_DIR": str(self.slurm_dir),
            "FAKE_SLURM_KILL_WAIT_S": "3",
            "SLURM_JOB_ID": self.id,
            "SLURM_JOB_NODELIST": ",".join(NODES),
            "SLURM_SUBMIT_DIR": str(self.submit_dir),
            "SLURM_CPUS_PER_TASK": "1",
            "TMPDIR": str(tmp_path / "node-local"),
            "HPO_RAY_PORT": str(free_port()),
            "HPO_PORT": str(self.port),
            "HPO_TOKEN": self.token,
            "HPO_READY_TIMEOUT_S": "120",
            "HPO_WATCHDOG_INTERVAL_S": "1",
            "HPO_WATCHDOG_FAILURES": "3",
            "HPO_SCHEDULER_INTERVAL_S": "0.5",
        }
        self.log = tmp_path / "job.log"

    def start(self, spec: Path) -> subprocess.Popen:
        return subprocess.Popen(
            ["bash", str(SBATCH), str(spec)],
            cwd=self.submit_dir,
            env=self.env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_for_studies(
        self, proc: subprocess.Popen, check: Callable[[list], bool], what: str
    ) -> None:
        """Wait (up to 180 s, the job still running) until ``check`` holds of the studies
        the job's server lists."""
        client = Client(f"http://127.0.0.1:{self.port}", self.token)

        def holds() -> bool:
            assert proc.poll() is None, self.output()
            try:
                return check(client.studies())
            except (httpx.HTTPError, HpoError):
                return False

        wait_for(holds, 180, what)

    def output(self) -> str:
        logs = sorted((self.submit_dir / f"hpo-{self.id}-logs").glob("*.log"))
        tails = [f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs]
        return "\n".join([self.log.read_text()[-6000:], *tails, ray_errors(*self.temp_dirs)])

    def cleanup(self) -> None:
        remove(*self.temp_dirs)


def test_sbatch_runs_a_study_across_two_nodes_from_a_fresh_account(
    tmp_path: Path, marked: Marked
) -> None:
    job = Job(tmp_path, marked)
    try:
        spec = write_spec(tmp_path / "study.yaml", "slurm-smoke", trials=2)
        proc = job.start(spec)
        assert proc.wait(timeout=300) == 0, job.output()
        rows = list(csv.DictReader((job.submit_dir / f"hpo-{job.id}.csv").open()))
        assert len(rows) == 2, job.output()
        assert {row["state"] for row in rows} == {"complete"}, rows
        # the SQLite database lived node-local and was kept in the submit dir
        assert (job.submit_dir / f"hpo-{job.id}.db").is_file()
        assert not (tmp_path / "node-local" / f"hpo-{job.id}").exists()
        # a Ray token was created for the account, private to it
        token = token_path(marked.home)
        assert len(token.read_text()) == 64
        assert token.stat().st_mode & 0o777 == 0o600
        assert marked.processes() == {}, "processes the job started are still running"
    finally:
        job.cleanup()


def test_sbatch_gives_up_when_the_control_plane_dies(tmp_path: Path, marked: Marked) -> None:
    job = Job(tmp_path, marked)
    try:
        spec = write_spec(tmp_path / "study.yaml", "slurm-crash", step_s=2.0, steps=100)
        proc = job.start(spec)
        job.wait_for_studies(proc, bool, "the study")
        serve = [pid for pid, cmd in marked.processes().items() if " serve " in f"{cmd} "]
        assert len(serve) == 1, marked.processes()
        os.kill(serve[0], signal.SIGKILL)  # the control plane dies mid-study
        # a bound so a hang fails the test instead of stalling it: the job must not wait for
        # the study (it would run ~200 s more) nor for the walltime
        status = proc.wait(timeout=120)
        assert status == 3, job.output()
        assert "hpo serve died mid-study" in job.log.read_text()
        assert marked.processes() == {}, "processes the job started are still running"
        # the copy of the node-local database holds what the killed server had committed
        # (a plain cp left out its write-ahead log: no table at all)
        with sqlite3.connect(job.submit_dir / f"hpo-{job.id}.db") as db:
            names = [name for (name,) in db.execute("SELECT name FROM studies")]
        assert names == ["slurm-crash"], job.output()
    finally:
        job.cleanup()


def test_sbatch_cancelled_mid_study_keeps_the_trials_so_far(tmp_path: Path, marked: Marked) -> None:
    """scancel, or the walltime's SIGTERM to the batch shell (--signal=B:TERM@120): the job
    ends with 143 and still writes hpo-<job>.csv (only a study that ran to its end was
    exported) and hpo-<job>.db."""
    job = Job(tmp_path, marked)
    try:
        spec = write_spec(tmp_path / "study.yaml", "slurm-cancel", step_s=2.0, steps=100)
        proc = job.start(spec)
        job.wait_for_studies(proc, lambda found: any(s.counts["running"] for s in found), "a trial")
        proc.send_signal(signal.SIGTERM)  # to the batch shell only, as Slurm's B: does
        assert proc.wait(timeout=120) == 143, job.output()
        rows = list(csv.DictReader((job.submit_dir / f"hpo-{job.id}.csv").open()))
        assert [row["state"] for row in rows] == ["running"], job.output()
        assert (job.submit_dir / f"hpo-{job.id}.db").is_file()
        assert marked.processes() == {}, "processes the job started are still running"
    finally:
        job.cleanup()


def test_sbatch_refuses_a_bad_spec_before_it_starts_anything(
    tmp_path: Path, marked: Marked
) -> None:
    job = Job(tmp_path, marked)
    try:
        spec = tmp_path / "study.txt"  # any name: a path, not YAML text
        spec.write_text(write_spec(tmp_path / "s.yaml", "bad").read_text() + "budgett: {}\n")
        proc = job.start(spec)
        assert proc.wait(timeout=60) == 1, job.output()
        text = job.log.read_text()
        assert "budgett: unknown field" in text and "is no valid study spec" in text, text
        assert not list(job.submit_dir.glob(f"hpo-{job.id}-logs/ray-*.log"))  # nothing started
    finally:
        job.cleanup()


def test_sbatch_fails_fast_when_ray_cannot_start(tmp_path: Path, marked: Marked) -> None:
    job = Job(tmp_path, marked)
    try:
        (job.slurm_dir / f"{NODES[0]}.env").write_text("export HPO_RAY_NODE_ARGS=--no-such-flag\n")
        proc = job.start(write_spec(tmp_path / "study.yaml", "slurm-no-ray"))
        assert proc.wait(timeout=120) == 1, job.output()
        assert "ray start exited" in job.log.read_text()
        assert not (job.submit_dir / f"hpo-{job.id}-logs" / "hpo-serve.log").exists()
        assert marked.processes() == {}
    finally:
        job.cleanup()


def test_sbatch_refuses_storage_a_node_does_not_see(tmp_path: Path, marked: Marked) -> None:
    job = Job(tmp_path, marked)
    try:
        if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"]).returncode:
            pytest.skip("a node-local view of a directory needs root (unshare, mount)")
        storage = tmp_path / "checkpoints"
        job.env["HPO_STORAGE_PATH"] = str(storage)
        # the second node sees an empty tmpfs there: storage that is not shared
        with (job.slurm_dir / f"{NODES[1]}.env").open("a") as env:
            env.write(f"export FAKE_SLURM_PRIVATE_DIR={storage}\n")
        proc = job.start(write_spec(tmp_path / "study.yaml", "slurm-storage"))
        assert proc.wait(timeout=60) == 1, job.output()
        assert "is not shared: fake-b does not see" in job.log.read_text()
        assert marked.processes() == {}
    finally:
        job.cleanup()


def test_sbatch_refuses_a_ray_token_others_can_read(tmp_path: Path, marked: Marked) -> None:
    job = Job(tmp_path, marked)
    try:
        token = token_path(marked.home)
        token.parent.mkdir()
        token.write_text("0" * 64)
        token.chmod(0o640)
        proc = job.start(write_spec(tmp_path / "study.yaml", "slurm-token"))
        assert proc.wait(timeout=60) == 1, job.output()
        assert "has mode 640" in job.log.read_text()
        assert not list(job.submit_dir.glob(f"hpo-{job.id}-logs/ray-*.log"))  # nothing started
    finally:
        job.cleanup()
