"""Two deployments (two ``hpo serve``, two databases) on one Ray cluster: each has its own id,
so its own Ray namespace and dispatcher, and neither sees the other's attempts, although both
number their first trial 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ServerProcess
from tests.service.test_dispatch import finished, ray_cluster, start_server, synthetic

pytestmark = pytest.mark.ray
__all__ = ["ray_cluster"]  # the fixture, used by name


def one_trial(x: float, steps: int) -> dict:
    return synthetic(
        f"x-{x}",
        space={"x": {"type": "categorical", "choices": [x]}},
        trainable={"name": "synthetic", "config": {"steps": steps, "step_s": 0.5}},
    )


def test_two_deployments_on_one_cluster_never_see_each_others_attempts(
    tmp_path: Path, ray_cluster: str
) -> None:
    servers: list[ServerProcess] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            servers.append(start_server(tmp_path / name, HPO_RAY_ADDRESS=ray_cluster))
        # both at once; the losses differ: (x - 0.3)² + 1/steps + 0.0005 (two ranks)
        runs = {0.3: 8, 0.9: 10}
        studies = [
            server.client().create_study(one_trial(x, steps))
            for server, (x, steps) in zip(servers, runs.items(), strict=True)
        ]
        for study in studies:
            finished(study, timeout=180)
        for server, study, (x, steps) in zip(servers, studies, runs.items(), strict=True):
            (trial,) = study.trials()
            trial = server.client().trial(trial.id)
            assert trial.id == 1  # the same key in both databases
            assert trial.state == "complete" and trial.attempts == 1
            assert {e.attempt for e in trial.events} == {1}
            assert trial.value == pytest.approx((x - 0.3) ** 2 + 1 / steps + 0.0005)
            assert [p.step for p in study.metrics(trial.id, "loss")] == list(range(1, steps + 1))
    finally:
        for server in servers:
            server.stop()
