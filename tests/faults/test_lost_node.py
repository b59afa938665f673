"""A node lost under a running trial: the README's "a lost node fails the attempt and frees
its slot". Two Ray nodes of one CPU each (two raylets on this host, each its own process
group and temp dir), a trial of two DDP ranks that needs both; the second node's whole
process group is killed (SIGKILL) while the trial streams. The attempt must fail as a loss of
the infrastructure (no ``max_retries`` spent: the study allows none), hold no slot, and run
again once a replacement node joins (as an autoscaler would add one), to the end: each step
stored once, nothing else left running."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, assert_each_point_stored_once, failed_attempts, wait_for
from tests.service.test_dispatch import RAY_ENV, _alive_nodes, finished, ray_node, synthetic

pytestmark = pytest.mark.ray

STEPS = 40


def test_a_lost_node_fails_the_attempt_as_infrastructure_and_frees_its_slot(
    tmp_path: Path,
) -> None:
    with contextlib.ExitStack() as stack:
        head = stack.enter_context(ray_node(1))
        node_b = stack.enter_context(ray_node(1, join=head))
        env = {**RAY_ENV, "HPO_RAY_ADDRESS": head}
        server = stack.enter_context(
            ServerProcess(f"sqlite:///{tmp_path / 'hpo.db'}", tmp_path, env)
        )
        client = server.client()
        study = client.create_study(
            synthetic(
                "lost-node",
                max_retries=0,  # a retry charged to the trial would fail it
                trainable={"name": "synthetic", "config": {"steps": STEPS, "step_s": 0.25}},
            )
        )
        trial = wait_for(lambda: study.trials(state="running"), 120, "a running trial")[0]
        wait_for(lambda: len(study.metrics(trial.id, "loss")) >= 3, 120, "first points")

        node_b.kill()  # the second node's raylet, workers and all: SIGKILL, no goodbye

        def failed_once() -> bool:
            return bool(failed_attempts(client.trial(trial.id))[0])

        wait_for(failed_once, 180, "the lost attempt to fail")
        lost = client.trial(trial.id)
        failures, charged = failed_attempts(lost)
        assert len(failures) == 1 and not charged, failures  # the infrastructure's, for free
        assert lost.state in ("waiting", "running"), lost.state  # queued for attempt 2
        # Its slot is free: nothing of attempt 1 still counts as running.
        assert all(t.id != trial.id or t.attempts == 2 for t in study.trials(state="running"))

        # Ray has noticed: the head alone is alive, so the replacement's join is counted
        wait_for(lambda: _alive_nodes(head) == 1, 120, "the lost node declared dead")
        stack.enter_context(ray_node(1, join=head))  # a replacement node
        finished(study, timeout=240)
        done = client.trial(trial.id)
        assert study.state == "completed" and done.state == "complete", [
            (e.state, e.detail) for e in done.events
        ]
        assert done.attempts == 2
        assert sorted({p.step for p in study.metrics(trial.id, "loss")}) == list(
            range(1, STEPS + 1)
        )
        # attempt 2 went on from attempt 1's last checkpoint or began again: either way each
        # step is stored once for the attempt that wrote it, and the curve has no hole
        stored = assert_each_point_stored_once(
            server.database_url, trial.id, None, name="loss", across_attempts=False
        )
        assert {attempt for attempt, _, _ in stored} == {1, 2}
        assert len(study.trials()) == 1  # no trial number spent on the loss
