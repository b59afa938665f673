"""Which checkpoint a retried attempt resumes from."""

from __future__ import annotations

from pathlib import Path

from hpo.workers.runner import latest_checkpoint


def make(root: Path, attempt: int, step: int, *, complete: bool = True) -> Path:
    ckpt = root / f"attempt-{attempt}" / f"checkpoint-{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"x")
    if complete:
        (ckpt / "meta.json").write_text("{}")
    return ckpt


def test_newest_complete_checkpoint_of_an_earlier_attempt(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path, before_attempt=2) is None
    four = make(tmp_path, 1, 4)
    make(tmp_path, 1, 5, complete=False)  # cut off while writing
    make(tmp_path, 1, 2)
    assert latest_checkpoint(tmp_path, before_attempt=2) == str(four)
    six = make(tmp_path, 2, 6)
    make(tmp_path, 3, 9)  # the current attempt's own files never count
    assert latest_checkpoint(tmp_path, before_attempt=3) == str(six)
    assert latest_checkpoint(tmp_path, before_attempt=2) == str(four)


def test_a_resumed_attempt_recalls_what_earlier_attempts_reported(tmp_path: Path) -> None:
    import torch

    from hpo.workers.context import Objective, TrialContext

    ctx = TrialContext(
        trial_id=1,
        study_id=1,
        number=0,
        attempt=2,
        params={},
        settings=None,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        objectives=[Objective("acc", "maximize")],
        checkpoint_dir=tmp_path,
    )
    history = {"acc": [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.99)]}
    ctx.recall(lambda name: history.get(name, []), up_to=3)  # step 4 came after the checkpoint
    assert ctx.last == {"acc": 0.7} and ctx.best == {"acc": 0.9} and ctx.last_step == 3
