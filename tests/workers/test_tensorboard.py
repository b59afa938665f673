"""Live TensorBoard scalars of a trial (``HPO_TENSORBOARD_DIR``): written as reported, and a
folder that cannot be written costs the trial nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hpo.workers.tensorboard import LiveScalars


def test_points_read_back_from_the_attempts_event_file(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    live = LiveScalars(str(tmp_path / "trial-0003"), attempt=2)
    live.add(1, {"loss": 0.5, "acc": 0.25})
    live.add(2, {"loss": 0.25})
    live.close()
    (event_file,) = (tmp_path / "trial-0003").iterdir()
    assert event_file.name.endswith(".attempt-2")
    scalars = EventAccumulator(str(tmp_path / "trial-0003")).Reload()
    assert [(e.step, e.value) for e in scalars.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in scalars.Scalars("acc")] == [(1, 0.25)]


def test_a_folder_that_cannot_be_written_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="hpo.workers.tensorboard"):
        live = LiveScalars(str(blocker / "trial-0000"), attempt=1)
    live.add(1, {"loss": 1.0})  # nothing to write to: no error
    live.close()
    assert "cannot write TensorBoard events" in caplog.text
