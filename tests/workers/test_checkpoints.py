"""The checkpoint life cycle of a trial: atomic writes, which checkpoint a retried attempt
resumes from (only inside its trial's folder, skipping an unreadable newest one), what resuming
restores (best/last values, the loss guard's reference), and points re-sent after a crash."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from hpo.workers import checkpoints
from hpo.workers.context import Objective, TrialContext
from hpo.workers.guards import LossGuard
from hpo.workers.registry import TrainableError
from hpo.workers.reporter import MetricReporter
from tests.conftest import ServerProcess, simple_spec


def make(root: Path, attempt: int, step: int, *, complete: bool = True) -> Path:
    ckpt = root / f"attempt-{attempt}" / f"checkpoint-{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"x")
    if complete:
        (ckpt / "meta.json").write_text("{}")
    return ckpt


def context(trial_dir: Path, attempt: int, **over: Any) -> TrialContext:
    fields: dict[str, Any] = {
        "trial_id": 1,
        "study_id": 1,
        "number": 0,
        "attempt": attempt,
        "params": {},
        "settings": None,
        "rank": 0,
        "world_size": 1,
        "device": torch.device("cpu"),
        "objectives": [Objective("acc", "maximize")],
        "trial_dir": trial_dir,
    }
    return TrialContext(**{**fields, **over})


def test_newest_complete_checkpoint_of_an_earlier_attempt(tmp_path: Path) -> None:
    assert checkpoints.candidates(tmp_path, before_attempt=2) == []
    four = make(tmp_path, 1, 4)
    make(tmp_path, 1, 5, complete=False)  # cut off while writing
    make(tmp_path, 1, 2)
    assert checkpoints.candidates(tmp_path, before_attempt=2)[0] == four
    six = make(tmp_path, 2, 6)
    make(tmp_path, 3, 9)  # the current attempt's own files never count
    assert checkpoints.candidates(tmp_path, before_attempt=3)[0] == six
    assert checkpoints.candidates(tmp_path, before_attempt=2)[0] == four


def test_a_later_attempts_checkpoint_comes_before_an_earlier_ones_further_step(
    tmp_path: Path,
) -> None:
    """Attempt 1 was told to pause at step 4 but saved step 5 before it stopped; attempt 2
    resumed at 4 (from a PBT copy placed in its folder) and died before saving: its retry
    resumes the copy, not attempt 1's own state at step 5."""
    make(tmp_path, 1, 4)
    make(tmp_path, 1, 5)
    copy = make(tmp_path, 2, 4)
    assert checkpoints.candidates(tmp_path, before_attempt=3)[0] == copy
    assert checkpoints.attempt_of(copy) == 2 and checkpoints.attempt_of(tmp_path) is None


def test_writes_are_atomic_and_old_checkpoints_pruned(tmp_path: Path) -> None:
    folder = tmp_path / "attempt-1"
    for step in (1, 2, 3):
        checkpoints.write(folder, step, {"w": torch.ones(2) * step}, {"step": step})
    (folder / ".checkpoint-000004.crashed").mkdir()  # a write a crash cut short
    checkpoints.prune(folder, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-000002", "checkpoint-000003"]
    state, meta = checkpoints.load(folder / "checkpoint-000003", torch.device("cpu"))
    assert state["w"].tolist() == [3.0, 3.0] and meta == {"step": 3}
    assert checkpoints.candidates(tmp_path, before_attempt=2) == [
        folder / "checkpoint-000003",
        folder / "checkpoint-000002",
    ]


def test_the_newest_checkpoints_are_kept_by_step_past_a_million(tmp_path: Path) -> None:
    """Names pad steps to six digits: by name, checkpoint-1000000 sorted before -999999, and
    pruning removed the checkpoint just written; the newest attempt folder likewise
    (attempt-10 before attempt-9) for the checkpoint a model is loaded from."""
    from hpo.workers.inference import _checkpoint_dir

    folder = tmp_path / "attempt-1"
    for step in (999_998, 999_999, 1_000_000):
        checkpoints.write(folder, step, {"w": torch.ones(1)}, {"step": step})
    checkpoints.prune(folder, keep=2)
    assert sorted(checkpoints.step_of(p) for p in folder.iterdir()) == [999_999, 1_000_000]
    for attempt in (9, 10):
        checkpoints.write(tmp_path / f"attempt-{attempt}", 1, {"w": torch.ones(1)}, {"step": 1})
    assert _checkpoint_dir(tmp_path) == tmp_path / "attempt-10" / "checkpoint-000001"


def test_a_checkpoint_leading_outside_the_trial_folder_is_refused(tmp_path: Path) -> None:
    trial = tmp_path / "trial-1"
    outside = tmp_path / "elsewhere"
    checkpoints.write(outside, 9, {"w": torch.zeros(1)}, {"step": 9})
    (trial / "attempt-1").mkdir(parents=True)
    os.symlink(outside / "checkpoint-000009", trial / "attempt-1" / "checkpoint-000009")
    os.symlink(outside, trial / "attempt-2")  # a whole attempt folder elsewhere
    good = checkpoints.write(trial / "attempt-1", 3, {"w": torch.zeros(1)}, {"step": 3})
    assert checkpoints.candidates(trial, before_attempt=5) == [good]


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_corrupt(
    tmp_path: Path,
) -> None:
    first = context(tmp_path, 1)
    model = torch.nn.Linear(2, 1)
    for step in (1, 2):
        first.report(step, {"acc": 0.5 * step}, checkpoint={"model": model, "seen": step})
    newest = tmp_path / "attempt-1" / "checkpoint-000002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated on disk
    resumed = context(tmp_path, 2).resume(model=torch.nn.Linear(2, 1))
    assert resumed is not None and resumed.step == 1 and resumed.values == {"seen": 1}
    assert resumed.path == tmp_path / "attempt-1" / "checkpoint-000001"


def test_resume_without_a_saved_object_says_so(tmp_path: Path) -> None:
    context(tmp_path, 1).save(1, model=torch.nn.Linear(2, 1))
    with pytest.raises(TrainableError, match="holds no 'optimizer'"):
        context(tmp_path, 2).resume(optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1))
    assert context(tmp_path, 1).resume() is None  # a first attempt has nothing to resume


def test_a_resume_says_when_the_checkpoint_was_saved_with_other_settings(
    tmp_path: Path,
) -> None:
    """A retry or an ASHA promotion resumes with the settings it saved; a replayed schedule's
    next segment (or a PBT copy) resumes with others, and the built-ins then ``rebase`` their
    optimizer onto the new rates."""
    context(tmp_path, 1, settings={"lr": 0.1}).save(2, model=torch.nn.Linear(2, 1))
    same = context(tmp_path, 2, settings={"lr": 0.1}).resume(model=torch.nn.Linear(2, 1))
    assert same is not None and not same.retuned and same.copied_from is None
    other = context(tmp_path, 2, settings={"lr": 0.05}).resume(model=torch.nn.Linear(2, 1))
    assert other is not None and other.retuned and other.copied_from is None
    tupled = context(tmp_path, 3, settings={"betas": (0.9, 0.99)})  # JSON keeps a list
    tupled.save(4, model=torch.nn.Linear(2, 1))
    again = context(tmp_path, 4, settings={"betas": (0.9, 0.99)})
    assert not again.resume(model=torch.nn.Linear(2, 1)).retuned
    copied = context(tmp_path, 2, trial_id=7, settings={"lr": 0.1})
    resumed = copied.resume(model=torch.nn.Linear(2, 1))
    assert resumed is not None and resumed.retuned and resumed.copied_from == 1


def test_a_resumed_attempt_keeps_what_earlier_attempts_reported(tmp_path: Path) -> None:
    first = context(tmp_path, 1)
    for step, acc in ((1, 0.5), (2, 0.9), (3, 0.7)):
        first.report(step, {"acc": acc}, checkpoint={})
    first.report(4, {"acc": 0.99})  # step 4 came after the last checkpoint
    ctx = context(tmp_path, 2)
    assert ctx.resume() is not None
    assert ctx.last == {"acc": 0.7} and ctx.best == {"acc": 0.9} and ctx.last_step == 3


def test_a_resumed_attempt_is_not_judged_against_its_own_first_loss(tmp_path: Path) -> None:
    guard = LossGuard(10.0)
    for step, loss in enumerate((2.3, 0.9, 0.2, 0.04), start=1):  # attempt 1 trains well
        guard.check(step, loss)
    context(tmp_path, 1).save(4, guard=guard)
    fresh = LossGuard(10.0)
    fresh.check(5, 0.033)  # what a new guard would take as its reference...
    with pytest.raises(TrainableError, match="training diverged"):
        fresh.check(179, 0.3591)  # ...and then fail a normal fluctuation
    restored = LossGuard(10.0)
    assert context(tmp_path, 2).resume(guard=restored) is not None
    restored.check(5, 0.033)
    restored.check(179, 0.3591)  # sane against the trial's first loss (2.3)
    with pytest.raises(TrainableError, match=r"exceeds 10 x the first loss \(2\.3\)"):
        restored.check(180, 24.0)


def test_a_point_cut_off_between_checkpoint_and_delivery_is_sent_by_the_resume(
    sqlite_server: ServerProcess, tmp_path: Path
) -> None:
    client = sqlite_server.client()
    study = client.create_study(simple_spec("resend"))
    trial = study.ask()

    def reporter() -> MetricReporter:
        url, token = sqlite_server.url, sqlite_server.token
        return MetricReporter(url, trial.trial_id, token=token, flush_s=0.05)

    first = context(tmp_path, 1, reporter=reporter(), delivery_timeout_s=0.5)
    first.objectives = [Objective("loss", "minimize")]
    for step in (1, 2):
        first.report(step, {"loss": 1.0 / step}, checkpoint={})
    sqlite_server.kill()  # the control plane goes away...
    first.report(3, {"loss": 0.25}, checkpoint={})  # ...so step 3 is only in the checkpoint
    assert first.reporter.close(timeout=0) is False  # and the attempt dies
    meta = json.loads((tmp_path / "attempt-1" / "checkpoint-000003" / "meta.json").read_text())
    assert meta["metrics"] == {"loss": 0.25} and meta["delivered"] is False

    sqlite_server.start()
    second = context(tmp_path, 2, reporter=reporter())
    resumed = second.resume()
    assert resumed is not None and resumed.next_step == 4
    second.report(4, {"loss": 0.2})
    assert second.reporter.close(timeout=30)
    points = sqlite_server.client().study(study.id).metrics(trial.trial_id, "loss")
    assert [(p.step, p.value) for p in points] == [(1, 1.0), (2, 0.5), (3, 0.25), (4, 0.2)]

    again = context(tmp_path, 2, reporter=reporter())  # the server holds step 3 now
    assert again.resume() is not None and again.reporter.close(timeout=30)
    points = sqlite_server.client().study(study.id).metrics(trial.trial_id, "loss")
    assert [p.step for p in points] == [1, 2, 3, 4]


def test_points_logged_after_a_report_are_in_the_checkpoint_until_delivered(
    sqlite_server: ServerProcess, tmp_path: Path
) -> None:
    """A report (delivered), then ``log`` of more points at that step, then the control plane
    goes away and the trainable saves: those points are the checkpoint's unsent ones, which
    a resume sends. The checkpoint waited only for the report's points, found them
    delivered and recorded nothing unsent."""
    client = sqlite_server.client()
    study = client.create_study(simple_spec("logged"))
    trial = study.ask()
    url, token = sqlite_server.url, sqlite_server.token
    reporter = MetricReporter(url, trial.trial_id, token=token, flush_s=0.05)
    ctx = context(tmp_path, 1, reporter=reporter, delivery_timeout_s=0.5)
    ctx.objectives = [Objective("loss", "minimize")]
    ctx.report(1, {"loss": 0.5})
    assert reporter.wait_sent(reporter.log(1, {}), timeout=10)  # the report is delivered
    sqlite_server.kill()
    ctx.log(1, {"train_loss": 0.7})
    ctx.save(1, w=torch.ones(1))
    meta = json.loads((tmp_path / "attempt-1" / "checkpoint-000001" / "meta.json").read_text())
    assert meta["delivered"] is False
    assert {"step": 1, "name": "train_loss", "value": 0.7} in meta["unsent"]
    reporter.close(timeout=0)
