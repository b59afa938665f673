"""Studies dispatched to a real local Ray: DDP with world size 2 (gloo), live metric streams,
ASHA, retries from checkpoints, hung workers, stop/cancel, and control-plane restarts."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from hpo.api.client import Study
from hpo.api.demo import free_port
from hpo.service.spec import StudySpec
from tests.api.test_cli import run_cli
from tests.api.test_metrics_endpoint import scrape, value
from tests.conftest import ServerProcess, assert_each_point_stored_once, failed_attempts, wait_for

pytestmark = pytest.mark.ray

# Two GPUs declared to Ray on a machine that has none: Ray still assigns them to the ranks
# that ask (CUDA_VISIBLE_DEVICES), which is how the test below sees the pinning.
RAY_ENV = {"HPO_RAY_NUM_CPUS": "4", "HPO_RAY_NUM_GPUS": "2", "HPO_SCHEDULER_INTERVAL_S": "0.5"}


def start_server(tmp: Path, **env: str) -> ServerProcess:
    server = ServerProcess(f"sqlite:///{tmp / 'hpo.db'}", tmp, {**RAY_ENV, **env})
    server.start()
    return server


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One control plane with its local Ray, shared by the tests that do not kill it; its
    trials write live TensorBoard scalars under ``data_dir/tensorboard``."""
    data = tmp_path_factory.mktemp("ray-server")
    server = start_server(data, HPO_TENSORBOARD_DIR=str(data / "tensorboard"))
    try:
        yield server
    finally:
        server.stop()


def synthetic(name: str, **over: object) -> dict:
    spec: dict = {
        "name": name,
        "objective": {"metric": "loss", "direction": "minimize"},
        "sampler": {"type": "random", "seed": 0},
        "budget": {"max_trials": 1},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
        "trainable": {"name": "synthetic", "config": {"steps": 5}},
        "space": {"x": {"type": "float", "low": -1, "high": 1}},
    }
    spec.update(over)
    return spec


def finished(study: Study, timeout: float = 180) -> None:
    wait_for(lambda: study.state in ("completed", "stopped"), timeout, f"study {study.name}")


def test_the_served_heap_is_frozen_again_once_ray_is_connected(tmp_path: Path) -> None:
    """``hpo serve`` freezes its start-up heap out of garbage collection, and Ray's modules and
    client with it once the scheduler has connected to Ray (when a study first needs it)."""
    server = start_server(tmp_path)
    try:
        at_start = value(scrape(server), "hpo_gc_frozen_objects")
        assert at_start > 50_000  # modules, engine, app; Ray is not imported yet
        with server.client() as client:
            finished(client.create_study(synthetic("frozen-with-ray")))
        wait_for(
            lambda: value(scrape(server), "hpo_gc_frozen_objects") > at_start + 10_000,
            30,
            "the heap frozen again with Ray's objects",
        )
    finally:
        server.stop()


def tensorboard_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """The (step, value) scalars of ``tag`` in the event files of a TensorBoard run folder."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    found = []
    for path in sorted(run.glob("events.out.tfevents.*")):
        for record in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(record)
            found += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return found


def test_ddp_trial_streams_metrics_while_it_runs(ray_server: ServerProcess) -> None:
    client = ray_server.client()
    study = client.create_study(
        synthetic("live", trainable={"name": "synthetic", "config": {"steps": 12, "step_s": 0.5}})
    )
    trial = wait_for(lambda: study.trials(state="running"), 60, "a running trial")[0]
    # points reach the database, and TensorBoard, while the trial is still running
    wait_for(lambda: len(study.metrics(trial.id, "loss")) >= 2, 60, "streamed points")
    run = ray_server.data_dir / "tensorboard" / "live" / f"trial-{trial.number:04d}"
    wait_for(lambda: len(tensorboard_scalars(run, "loss")) >= 2, 60, "live TensorBoard scalars")
    assert client.trial(trial.id).state == "running"
    finished(study)
    done = client.trial(trial.id)
    assert done.state == "complete"
    points = study.metrics(trial.id, "loss")
    assert [p.step for p in points] == list(range(1, 13))
    # one event file, of attempt 1, written by rank 0: the same points
    assert [p.name for p in run.iterdir()] == [p.name for p in run.glob("*.attempt-1")]
    scalars = tensorboard_scalars(run, "loss")
    assert [step for step, _ in scalars] == [p.step for p in points]
    assert [value for _, value in scalars] == pytest.approx([p.value for p in points], rel=1e-6)
    assert done.value == points[-1].value  # objective scope "last"
    placement = done.placement
    assert placement["world_size"] == 2 and placement["executor"] == "ray"
    ranks = placement["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len({r["pid"] for r in ranks}) == 2
    assert all(r["device"] == "cpu" for r in ranks)
    assert 0 <= placement["startup_s"] < 60


def test_image_classification_trial_trains_a_cnn_with_ddp(ray_server: ServerProcess) -> None:
    client = ray_server.client()
    study = client.create_study(
        {
            "name": "digits",
            "objective": {"metric": "val_accuracy", "direction": "maximize"},
            "budget": {"max_trials": 1},
            "resources": {"workers_per_trial": 2},
            "trainable": {"name": "image-classification", "config": {"epochs": 3}},
            "space": {"lr": {"type": "categorical", "choices": [0.01]}},
        }
    )
    finished(study)
    best = study.best_trial
    assert best is not None and best.value > 0.8  # three epochs of Adam reach ~0.9+
    names = {p.name for p in study.metrics(best.id)}
    assert {"val_loss", "val_accuracy", "train_loss"} <= names
    archive = client.request("GET", f"/api/v1/studies/{study.id}/best/checkpoint").content
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("state.pt"))
        state = torch.load(io.BytesIO(tar.extractfile(member).read()), weights_only=True)
    assert state["epoch"] == 3 and "features.0.weight" in state["model"]


def test_best_trial_gets_test_metrics_once_the_study_completes(
    ray_server: ServerProcess, tmp_path: Path
) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "hpo.api.cli", *args]
        command += ["--url", ray_server.url, "--token", ray_server.token]
        return subprocess.run(command, capture_output=True, text=True, timeout=180)

    spec_file = tmp_path / "evaluated.yaml"
    spec_file.write_text(yaml.safe_dump(synthetic("evaluated", budget={"max_trials": 2})))
    # `submit --wait` runs the study and waits for the best trial's test metrics
    submitted = cli("submit", str(spec_file), "--wait")
    assert submitted.returncode == 0, submitted.stderr
    assert "completed: budget spent" in submitted.stdout
    assert "test metrics: test_loss=" in submitted.stdout
    study = ray_server.client().study("evaluated")
    best = study.best_trial
    assert best.test_metrics == {"test_loss": best.value, "test_step": 5.0}
    others = [t for t in study.trials() if t.id != best.id]
    assert all(t.test_metrics is None for t in others)  # the best trial only
    shown = cli("best", str(study.id))
    assert shown.returncode == 0 and "test metrics: test_loss=" in shown.stdout


def test_asha_stops_a_bad_trial_early(ray_server: ServerProcess) -> None:
    client = ray_server.client()
    study = client.create_study(
        synthetic(
            "asha",
            sampler={"type": "grid"},
            pruner={"type": "asha", "min_steps": 2, "reduction_factor": 2},
            budget={"max_concurrent": 1},
            trainable={"name": "synthetic", "config": {"steps": 8}},
            space={"x": {"type": "float", "values": [0.3, 0.35, 3.0]}},
        )
    )
    finished(study)
    by_x = {t.params["x"]: t for t in study.trials()}
    assert by_x[0.3].state == "complete"
    bad = by_x[3.0]
    assert bad.state == "pruned"
    # pruned at the first rung, min_steps * reduction_factor**0 = step 2 (rung 0), and it
    # stopped there: report() waits (up to 2 s) for the answer that says stop, and a point
    # sent after it is dropped; step 3 may only ride in step 2's batch when the server took
    # longer than that to answer step 1's
    assert bad.pruned["rung"] == 0 and bad.pruned["step"] == 2, bad.pruned
    assert bad.pruned["value"] > bad.pruned["threshold"]
    assert max(p.step for p in study.metrics(bad.id, "loss")) <= 3
    # one trial after another on the same resources: the same warm rank processes ran them
    # (the README's "warm worker processes are reused"; a fresh process per trial would
    # spawn and import torch each time)
    # (a trial pruned at once may end before its placement is written: not compared)
    placed = [client.trial(t.id).placement for t in study.trials()]
    ranks = [sorted(r["pid"] for r in p["ranks"]) for p in placed if p]
    assert len(ranks) >= 2 and len({tuple(r) for r in ranks}) < len(ranks), ranks


def test_killed_worker_is_retried_from_its_checkpoint(ray_server: ServerProcess) -> None:
    """No retry allowed: a worker that dies is lost to the machinery, retried for free."""
    client = ray_server.client()
    study = client.create_study(
        synthetic(
            "retry",
            max_retries=0,
            trainable={"name": "synthetic", "config": {"steps": 6, "fail_at_step": 4}},
        )
    )
    finished(study)
    trial = study.trials()[0]
    trial = client.trial(trial.id)
    assert trial.state == "complete" and trial.attempts == 2
    failure = next(e for e in trial.events if e.state == "failed")
    assert "attempt 1" in failure.detail and "retrying" in failure.detail
    failures, charged = failed_attempts(trial)
    assert len(failures) == 1 and charged == []  # not spent from max_retries
    # steps 1-3 ran in attempt 1 (checkpoint at 3), attempt 2 resumed at step 4: none twice
    steps = [p.step for p in study.metrics(trial.id, "loss")]
    assert sorted(steps) == list(range(1, 7))
    # the read keeps one point per step, the newest attempt's: none twice in the rows either
    stored = assert_each_point_stored_once(
        ray_server.database_url, trial.id, 6, name="loss", across_attempts=True
    )
    assert {step for _, _, step in stored} == set(range(1, 7))
    assert {attempt for attempt, _, _ in stored} == {1, 2}
    assert trial.has_checkpoint


def test_an_attempt_lost_after_its_last_step_is_finished_by_the_retry(
    ray_server: ServerProcess,
) -> None:
    client = ray_server.client()
    study = client.create_study(
        synthetic(
            "lost-at-the-end",
            max_retries=1,
            trainable={"name": "synthetic", "config": {"steps": 3, "fail_at_step": 4}},
        )
    )
    finished(study)
    trial = client.trial(study.trials()[0].id)
    assert trial.state == "complete" and trial.attempts == 2
    points = study.metrics(trial.id, "loss")
    assert [p.step for p in points] == [1, 2, 3]  # the retry had nothing left to train
    assert trial.value == points[-1].value


def test_a_trainable_error_fails_without_retry_and_keeps_the_text(
    ray_server: ServerProcess,
) -> None:
    client = ray_server.client()
    study = client.create_study(
        synthetic(
            "raises",
            max_retries=2,
            trainable={"name": "synthetic", "config": {"steps": 5, "raise_at_step": 2}},
        )
    )
    finished(study)
    trial = client.trial(study.trials()[0].id)
    # a Python error in user code is retried like Ray Tune does (it may be transient)...
    assert trial.state == "failed" and trial.attempts == 3
    assert "ValueError: synthetic failure at step 2" in trial.error
    assert "Traceback" in trial.error


def test_each_rank_is_pinned_to_its_own_gpu_and_no_gpu_is_a_clear_failure(
    ray_server: ServerProcess,
) -> None:
    client = ray_server.client()
    study = client.create_study(
        synthetic(
            "gpu",
            budget={"max_trials": 2, "max_concurrent": 2},
            resources={"workers_per_trial": 2, "gpus_per_worker": 1, "cpus_per_worker": 1},
        )
    )
    finished(study)
    trials = [client.trial(t.id) for t in study.trials()]
    assert [t.state for t in trials] == ["failed", "failed"]
    for trial in trials:
        # Ray gave the failing rank exactly one of the two GPUs; torch here sees none, and
        # the trial says so instead of silently training on the CPU
        assert re.search(
            r"the study asks for GPUs but this worker sees none \(CUDA_VISIBLE_DEVICES=[01],",
            trial.error,
        ), trial.error
    # 2 ranks x 1 GPU fill both GPUs: the two trials never held them at the same time
    first, second = sorted(trials, key=lambda t: t.started_at)
    assert second.started_at >= first.finished_at


def test_a_nan_loss_fails_the_trial_with_that_reason(ray_server: ServerProcess) -> None:
    client = ray_server.client()
    study = client.create_study(
        synthetic(
            "nan",
            max_retries=2,
            budget={"max_trials": 2, "max_concurrent": 1},
            space={"x": {"type": "categorical", "choices": [1e308]}},
        )
    )
    finished(study)
    first, second = sorted((client.trial(t.id) for t in study.trials()), key=lambda t: t.number)
    for trial in (first, second):
        # ... but a diverged loss is not: no retry can fix it
        failures, charged = failed_attempts(trial)
        assert trial.state == "failed" and trial.attempts == len(failures), failures
        assert len(charged) == 1 and charged[0].startswith("[deterministic]"), failures
        assert "loss is inf at step 1: training diverged" in trial.error
    # every rank raised on its own: none was force-cancelled (which kills its warm process)
    pids = [r["pid"] for t in (first, second) for r in t.placement["ranks"]]
    assert all(_alive(p) for p in pids), pids


def test_hung_worker_loses_its_lease_and_the_slot_is_reused(ray_server: ServerProcess) -> None:
    client = ray_server.client()
    study = client.create_study(
        synthetic(
            "hang",
            lease_s=4,
            budget={"max_trials": 2, "max_concurrent": 1},
            sampler={"type": "grid"},
            # the first trial freezes at step 2, the second runs normally
            space={"hang_at_step": {"type": "categorical", "choices": [2, None]}},
            trainable={"name": "synthetic", "config": {"steps": 4}},
        )
    )
    trial = wait_for(lambda: study.trials(state="running"), 60, "a running trial")[0]
    wait_for(lambda: client.trial(trial.id).placement, 60, "placement")
    pid = client.trial(trial.id).placement["ranks"][0]["pid"]
    wait_for(lambda: client.trial(trial.id).state == "failed", 60, "lease expiry")
    assert client.trial(trial.id).error == "lease expired"
    # the hung rank was cancelled (killed) and the next trial got the slot
    wait_for(lambda: not _alive(pid), 60, "the hung process to be killed")
    wait_for(lambda: len(study.trials()) == 2, 60, "the second trial")
    finished(study)
    assert study.record.counts == {
        "waiting": 0,
        "running": 0,
        "paused": 0,
        "complete": 1,
        "pruned": 0,
        "failed": 1,
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/status") as f:
        return "zombie" not in f.read()


def _running_a_trial(pid: int) -> bool:
    """Whether the process still runs a rank task (Ray titles it ray::trial-<id>-rank-<k>);
    a rank that stopped is either killed or back in Ray's pool as ray::IDLE."""
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().startswith("ray::trial-") and _alive(pid)
    except FileNotFoundError:
        return False


def pbt_pair(name: str, **config: Any) -> dict:
    """Two two-rank trials under PBT at every step: #0 (lr 0.16, 0.25 s a step) is the better
    one at each boundary the slow #1 (lr 0.0024, 1 s a step) reaches, so #1 copies #0."""
    space = {
        "lr": {"type": "float", "low": 0.001, "high": 0.5, "log": True, "mutable": True},
        "step_s": {"type": "categorical", "choices": [0.25, 1.0]},
    }
    return synthetic(
        name,
        sampler={"type": "random", "seed": 8},
        scheduler={"type": "pbt", "population": 2, "interval_steps": 1, "resample_p": 0.0},
        resources={"workers_per_trial": 2, "cpus_per_worker": 1},
        trainable={"name": "synthetic", "config": {"steps": 12, "x": 0.3, **config}},
        space=space,
        budget={},
    )


def fast_and_slow(study: Study) -> list[Any]:
    return sorted(study.trials(), key=lambda t: (t.schedule or [t])[0].params["step_s"])


def test_pbt_copies_a_better_trial_between_ddp_attempts_and_hpo_replay_reproduces_it(
    ray_server: ServerProcess,
) -> None:
    """Population based training on two-rank DDP trials: the slow trial with a poor learning
    rate is the worse one at each boundary it reaches, so it pauses (both ranks stop at the
    same step), resumes from the fast trial's checkpoint with its parameters (the learning
    rate perturbed), and converges as only the copied weight can make it. ``hpo replay``
    then trains one fresh trial along its lineage (the fast trial's rate up to the last copy,
    its own after): the same curve and the same value, to the last bit."""
    client = ray_server.client()
    study = client.create_study(pbt_pair("pbt"))
    finished(study)
    fast, slow = fast_and_slow(study)
    assert (fast.state, slow.state) == ("complete", "complete")
    first, *later = slow.schedule
    copies = [c for c in later if c.parent]  # the others resumed its own checkpoint
    assert first.params == {"lr": pytest.approx(0.0023867, rel=1e-3), "step_s": 1.0}
    assert copies and all(c.parent.number == fast.number for c in copies)
    assert copies[0].params["step_s"] == 0.25 and copies[0].perturbed["lr"] in ("x0.8", "x1.2")
    assert slow.params == later[-1].params and slow.attempts >= len(later) + 1
    # w from 1.0 with lr 0.0024 for 12 steps: loss 0.46; only the copied w gets it this low
    assert slow.value < 0.05
    details = [e.detail or "" for e in client.trial(slow.id).events]
    assert any(d.startswith("pbt exploit: paused") for d in details)
    assert any(f"pbt exploit: copies trial #{fast.number}" in d for d in details)
    assert slow.placement["world_size"] == 2 and fast.schedule is None

    last = copies[-1].step  # every step up to it was the fast trial's
    own = slow.schedule[slow.schedule.index(copies[-1]) :]  # the last copy and what followed
    expected = [(0, fast.params), *((s.step, s.params) for s in own)]
    lineage = study.lineage(slow.id)
    assert [(s.step, s.params) for s in lineage.schedule] == expected
    assert [s.trial_number for s in lineage.schedule] == [fast.number] + [slow.number] * len(own)
    assert lineage.problems == []
    done = run_cli(
        ray_server, "replay", str(study.id), "--trial", str(slow.number), "--name", "pbt-again"
    )
    assert done.returncode == 0, done.stderr
    along = f"along {len(expected)} segment(s)"
    assert f"replays trial {slow.number} of study {study.id} {along}" in done.stdout
    again = client.study("pbt-again")
    shown = run_cli(ray_server, "replay", str(study.id), "--trial", str(slow.number), "--print")
    assert shown.returncode == 0, shown.stderr
    printed = StudySpec.model_validate(yaml.safe_load(shown.stdout))
    assert printed.replay == StudySpec.model_validate(again.record.spec).replay
    finished(again)
    (replayed,) = again.trials()
    assert replayed.state == "complete" and replayed.value == slow.value
    assert [(s.step, s.params) for s in replayed.schedule] == expected
    curve = {p.step: p.value for p in again.metrics(replayed.id, "loss")}
    donor = {p.step: p.value for p in study.metrics(fast.id, "loss") if p.step <= last}
    mine = {p.step: p.value for p in study.metrics(slow.id, "loss") if p.step > last}
    assert curve == {**donor, **mine}


def test_a_rank_killed_after_a_pbt_copy_resumes_from_the_copy(ray_server: ServerProcess) -> None:
    """kill -9 of rank 0 right as the attempt that resumes from a copied checkpoint begins
    (before it trained a step): the retry resumes from that copy, the newest checkpoint in
    the trial's own folders, not from the trial's own older one; no step is stored twice and
    the steps the copy skipped are never trained."""
    client = ray_server.client()
    # 24 steps: #0 still runs (6 s) when #1 has paused at its first boundary and copies it
    kill = {"steps": 24, "fail_after_steps": 0, "fail_on_attempts": [2]}
    study = client.create_study({**pbt_pair("pbt-kill", **kill), "max_retries": 1})
    finished(study)
    fast, slow = fast_and_slow(study)
    slow = client.trial(slow.id)
    assert (fast.state, slow.state) == ("complete", "complete")
    copied = next(s for s in slow.schedule if s.parent)  # its first copy
    failures = [e.detail or "" for e in slow.events if e.state == "failed"]
    assert len(failures) == 1 and "attempt 2" in failures[0] and "retrying" in failures[0]
    steps = [p.step for p in study.metrics(slow.id, "loss")]
    assert len(steps) == len(set(steps)), steps  # none stored twice
    # it paused at its own step k (1 when #0 is already ahead then; later when #0 started
    # late) and copied #0 at step c > k: steps k+1..c were trained by #0, never by #1
    assert 1 < copied.step < 24, copied
    assert copied.step + 1 in steps, (copied, steps)
    k = steps.index(copied.step + 1)
    assert steps[: k + 1] == [*range(1, k + 1), copied.step + 1] and k < copied.step, steps
    # every step to 24 was trained here once or copied: what budget.max_steps charges it
    assert slow.last_step == 24 and slow.last_step - slow.steps_copied == len(steps)
    assert slow.value < 0.05  # the copied weight, not its own from step 1


def test_stop_cancels_running_trials(ray_server: ServerProcess) -> None:
    client = ray_server.client()
    study = client.create_study(
        synthetic("stop", trainable={"name": "synthetic", "config": {"steps": 200, "step_s": 0.2}})
    )
    trial = wait_for(lambda: study.trials(state="running"), 60, "a running trial")[0]
    wait_for(lambda: client.trial(trial.id).placement, 60, "placement")
    wait_for(lambda: study.metrics(trial.id, "loss"), 60, "the first points")
    pids = [r["pid"] for r in client.trial(trial.id).placement["ranks"]]
    study.stop()
    assert client.trial(trial.id).state == "failed"
    wait_for(lambda: not any(_alive(p) for p in pids), 60, "the ranks to be killed")
    time.sleep(1)
    assert max(p.step for p in study.metrics(trial.id, "loss")) < 200


def test_pause_drains_and_delete_cancels(ray_server: ServerProcess) -> None:
    client = ray_server.client()
    slow = {"name": "synthetic", "config": {"steps": 30, "step_s": 0.15}}
    study = client.create_study(
        synthetic("drain", budget={"max_trials": 3, "max_concurrent": 1}, trainable=slow)
    )
    first = wait_for(lambda: study.trials(state="running"), 60, "a running trial")[0]
    study.pause()
    # the running trial finishes normally; no new one starts while paused
    wait_for(lambda: client.trial(first.id).state == "complete", 60, "the drained trial")
    time.sleep(2)
    assert len(study.trials()) == 1 and study.state == "paused"
    study.resume()
    second = wait_for(lambda: study.trials(state="running"), 60, "a trial after resume")[0]
    wait_for(lambda: client.trial(second.id).placement, 60, "placement")
    pids = [r["pid"] for r in client.trial(second.id).placement["ranks"]]
    assert client.trial(second.id).state == "running"
    study.delete()
    wait_for(lambda: not any(_running_a_trial(p) for p in pids), 60, "the deleted trial to end")


def test_unregistered_trainable_and_bad_settings_are_422(ray_server: ServerProcess) -> None:
    with ray_server.http() as http:
        answer = http.post(
            "/api/v1/studies", json=synthetic("nope", trainable={"name": "no-such-thing"})
        )
        assert answer.status_code == 422
        assert "no trainable named 'no-such-thing'" in answer.json()["message"]
        assert answer.json()["field"] == "trainable.name"
        answer = http.post(
            "/api/v1/studies",
            json=synthetic("typo", trainable={"name": "synthetic", "config": {"stepz": 3}}),
        )
        assert answer.status_code == 422 and "trainable.config.stepz" in answer.json()["message"]
        answer = http.post(
            "/api/v1/studies",
            json=synthetic("type", trainable={"name": "synthetic", "config": {"steps": "many"}}),
        )
        assert answer.status_code == 422 and "trainable.config.steps" in answer.json()["message"]
        answer = http.post(
            "/api/v1/studies",
            json=synthetic("space", space={"y": {"type": "float", "low": 0, "high": 1}}),
        )
        assert answer.status_code == 422 and "space.y: not a setting" in answer.json()["message"]
        assert http.get("/api/v1/studies", params={"name": "nope"}).json()["studies"] == []


def test_two_studies_share_the_cluster(ray_server: ServerProcess) -> None:
    client = ray_server.client()
    slow = {"name": "synthetic", "config": {"steps": 4, "step_s": 0.3}}
    a = client.create_study(synthetic("share-a", budget={"max_trials": 8}, trainable=slow))
    b = client.create_study(synthetic("share-b", budget={"max_trials": 2}, trainable=slow))
    # 4 CPUs, 2 per trial: a may take both slots first, but b must get one long before a
    # has handed out its whole budget (first come, first served would starve b)
    wait_for(lambda: b.trials(state="running"), 60, "b running")
    assert a.record.n_trials < 6
    finished(a)
    finished(b)
    assert a.record.counts["complete"] == 8 and b.record.counts["complete"] == 2


def test_control_plane_killed_mid_study_finishes_exactly_the_budget(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        client = server.client()
        study = client.create_study(
            synthetic(
                "crash",
                max_retries=0,  # a retry charged to a trial would fail it
                budget={"max_trials": 5, "max_concurrent": 2},
                trainable={"name": "synthetic", "config": {"steps": 6, "step_s": 0.3}},
            )
        )
        wait_for(lambda: len(study.trials(state="complete")) >= 1, 120, "one complete trial")
        wait_for(lambda: study.trials(state="running"), 60, "running trials")
        server.kill()  # SIGKILL the control plane and its local Ray
        server.start()
        client = server.client()
        study = client.study(study.id)
        finished(study, timeout=240)
        trials = study.trials()
        assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4]
        assert len({t.id for t in trials}) == 5
        assert all(t.state == "complete" for t in trials)
        retried = [client.trial(t.id) for t in trials if t.attempts > 1]
        assert retried, "a trial running at the crash was retried"
        for trial in retried:
            failures, charged = failed_attempts(trial)
            assert failures and not charged, failures  # the infrastructure's: no retry spent
            assert any("control plane restarted" in (e.detail or "") for e in trial.events)
        for trial in trials:  # no hole in any curve, no point stored twice by one attempt
            assert [p.step for p in study.metrics(trial.id, "loss")] == list(range(1, 7))
            assert_each_point_stored_once(server.database_url, trial.id, name="loss")
    finally:
        server.stop()


_QUIET: dict = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "timeout": 60}


class RayNode(str):
    """The cluster's address, as :func:`ray_node` yields it, and the node's ``ray start``
    process group, which :meth:`kill` kills outright (SIGKILL: a node lost, not stopped)."""

    group: int

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.group, signal.SIGKILL)


@contextlib.contextmanager
def ray_node(num_cpus: int = 4, *, join: str | None = None) -> Iterator[RayNode]:
    """A Ray node in a process of its own (``ray start --block``, its own temp dir), stopped by
    its own PID: the head of a new cluster, or a node that joins the cluster at ``join``.
    Yields the cluster's address once the node is up (a :class:`RayNode`)."""
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    ray = Path(sys.executable).with_name("ray")
    if not ({"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env)):  # a fresh account has none
        subprocess.run([str(ray), "get-auth-token", "--generate"], env=env, check=True, **_QUIET)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are long
    role = (
        [f"--address={join}"] if join else ["--head", f"--port={port}", "--include-dashboard=false"]
    )
    before = _alive_nodes(join) if join else 0
    proc = subprocess.Popen(
        [
            str(ray),
            "start",
            *role,
            "--block",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=(log := open(Path(temp) / "start.log", "w")),  # noqa: SIM115 - closed below
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = RayNode(join or f"127.0.0.1:{port}")
    address.group = proc.pid  # start_new_session: the group of `ray start` and its raylet
    try:
        try:  # an exited `ray start` fails at once
            wait_for(lambda: proc.poll() is not None or _alive_nodes(address) > before, 120)
            assert proc.poll() is None, "ray start exited"
        except AssertionError as exc:
            log_text = (Path(temp) / "start.log").read_text()[-3000:]
            raise AssertionError(f"the Ray node did not start ({exc}):\n{log_text}") from None
        yield address
    finally:
        proc.terminate()  # Ray drains for up to 30 s: give it a moment, then end the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A separate Ray cluster of one node with 4 CPUs."""
    with ray_node(4) as address:
        yield address


def _alive_nodes(address: str) -> int:
    """How many nodes of the cluster at ``address`` are alive (0 when it cannot be reached)."""
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import ray; ray.init(address='{address}'); "
            "print(sum(1 for n in ray.nodes() if n['Alive'])); ray.shutdown()",
        ],
        env={**os.environ, "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = check.stdout.strip().splitlines()
    return int(lines[-1]) if check.returncode == 0 and lines and lines[-1].isdigit() else 0


def test_restarted_control_plane_re_adopts_trials_on_a_cluster(
    tmp_path: Path, ray_cluster: str
) -> None:
    server = start_server(tmp_path, HPO_RAY_ADDRESS=ray_cluster)
    try:
        client = server.client()
        study = client.create_study(
            synthetic(
                "adopt", trainable={"name": "synthetic", "config": {"steps": 30, "step_s": 0.4}}
            )
        )
        trial = wait_for(lambda: study.trials(state="running"), 60, "a running trial")[0]
        wait_for(lambda: len(study.metrics(trial.id, "loss")) >= 2, 60, "first points")
        server.kill()
        time.sleep(2)
        server.start()
        study = server.client().study(study.id)
        finished(study, timeout=120)
        done = server.client().trial(trial.id)
        assert done.state == "complete" and done.attempts == 1  # adopted, not retried
        assert [p.step for p in study.metrics(trial.id, "loss")] == list(range(1, 31))
    finally:
        server.stop()
