"""Drill: the dispatcher actor's process is killed mid-study (as an out-of-memory kill would).

The control plane notices, starts a new dispatcher, and retries the attempts the dead one ran as
infrastructure losses: with ``max_retries`` 0 every trial still completes, and none fails.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from tests.conftest import ServerProcess, wait_for
from tests.faults.test_control_plane import ended, rank_pids, serve, synthetic

pytestmark = pytest.mark.ray


def dispatcher_pids(server: ServerProcess) -> list[int]:
    """The pids of the server's dispatcher actor (Ray titles it ``ray::TrialDispatcher...``)."""
    assert server.proc is not None
    found = []
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::TrialDispatcher"):
                found.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_killed_dispatcher_costs_no_retry_and_fails_no_trial(tmp_path: Path) -> None:
    server = serve(tmp_path, tmp_path / "hpo.db")
    try:
        study = server.client().create_study(
            synthetic("dispatcher", {"steps": 10, "step_s": 0.4}, budget={"max_trials": 2})
        )  # max_retries: 0; one CPU each, so both trials run at once
        running = wait_for(
            lambda: (t := study.trials(state="running")) and len(t) == 2 and t, 60, "two trials"
        )
        for trial in running:
            wait_for(lambda t=trial: rank_pids(server, t.id), 60, "the ranks to start")
        (old,) = wait_for(lambda: dispatcher_pids(server), 30, "the dispatcher")
        os.kill(old, signal.SIGKILL)
        ended(study, timeout=150)
        client = server.client()
        trials = [client.trial(t.id) for t in study.trials()]
        assert sorted(t.number for t in trials) == [0, 1]
        assert [t.state for t in trials] == ["complete", "complete"]  # wrongly failed 0
        for trial in trials:
            assert trial.attempts == 2  # the loss spent no retry (max_retries is 0)
            (loss,) = [e.detail for e in trial.events if e.state == "failed"]
            assert loss.startswith("[infrastructure] attempt 1:")
            assert "dispatcher died" in loss
        (new,) = dispatcher_pids(server)
        assert new != old
    finally:
        server.stop()
