"""The README's main command: ``hpo demo`` starts ``hpo serve`` and runs a study end to end."""

from __future__ import annotations

import json
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


_DRAW = """
import json, sys
from hpo.api.demo import free_ports
ports = free_ports(300)
print(json.dumps(ports), flush=True)
sys.stdin.read()  # hold the claims until told to stop
"""


def test_free_ports_are_never_handed_to_two_processes_and_lie_below_the_ephemeral_range() -> None:
    """The suite runs as two pytest processes, each starting servers on ports from
    ``free_ports``: a port one claimed is skipped by the other as long as it lives (its server
    may be down for a restart), and none lies where outgoing connections take theirs."""
    from hpo.api.demo import _ephemeral_low, free_ports

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DRAW], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        drawn = [set(json.loads(p.stdout.readline())) for p in procs]  # both hold theirs
        mine = set(free_ports(300))
    finally:
        for p in procs:
            p.communicate("", timeout=30)
    assert [len(d) for d in drawn] == [300, 300]
    assert not drawn[0] & drawn[1] and not mine & (drawn[0] | drawn[1])
    high = _ephemeral_low()
    assert all(20000 <= port < (high if high >= 21000 else 32768) for port in mine)
    again = set(free_ports(300))  # this process never hands a port out twice either
    assert not again & mine
