"""The README's main command: ``hpo demo`` starts ``hpo serve`` and runs a study end to end."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


def demo(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hpo.api.cli", "demo", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.ray
@pytest.mark.slow
def test_demo_dispatches_ddp_trials_on_ray_and_scores_the_best_one() -> None:
    run = demo("--trials", "3", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on the local Ray, 2 DDP workers each" in run.stderr
    assert re.search(r"3 trials in \d+ s", run.stderr), run.stderr[-3000:]
    assert re.search(r"best: trial \d, value 0\.\d+", run.stderr)
    # the best trial's checkpoint scored on the held-out test split, and where to fetch it
    assert re.search(r"held-out test metrics: test_loss=\d", run.stderr), run.stderr[-3000:]
    assert "/best/checkpoint" in run.stderr
    assert "params_lr" in run.stdout  # the trials table


def test_demo_over_ask_tell_in_the_client_process() -> None:
    run = demo("--ask-tell", "--trials", "4", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "in this process over ask/tell" in run.stderr
    assert re.search(r"4 trials in \d+ s", run.stderr), run.stderr[-3000:]
    assert "held-out test metrics" not in run.stderr  # no trainable, no evaluation
