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
