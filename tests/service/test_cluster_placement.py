"""Placement per node on a real two-node Ray cluster (two raylets of 1 CPU each on this host)
with a real ``hpo serve``: a rank larger than every node is failed with the reason (the
cluster was not known yet when its study was created) or refused with 422 (once it is), and
a DDP trial of two 1-CPU ranks runs with one rank on each node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess
from tests.service.test_dispatch import RAY_ENV, finished, ray_node, synthetic

pytestmark = pytest.mark.ray


@pytest.fixture
def two_nodes() -> Iterator[str]:
    """A head and a second node, 1 CPU each: 2 CPUs in all, but no node holds a 2-CPU rank."""
    with ray_node(1) as address, ray_node(1, join=address):
        yield address


def test_ranks_are_placed_per_node_on_a_two_node_cluster(tmp_path: Path, two_nodes: str) -> None:
    # a replica on the database that serves the API only: it judges new studies by the
    # snapshot the scheduling server stores there. It starts first, so the "early" study is
    # created before any server knew the cluster (the scheduling one connects to a cluster
    # at once, for the node preflight, and publishes the nodes within its first tick).
    (tmp_path / "replica").mkdir()
    database = f"sqlite:///{tmp_path / 'hpo.db'}"
    replica = ServerProcess(database, tmp_path / "replica", {"HPO_SCHEDULER": "false"})
    server = ServerProcess(database, tmp_path, {**RAY_ENV, "HPO_RAY_ADDRESS": two_nodes})
    server.token = replica.token
    try:
        replica.start()
        too_big = {"workers_per_trial": 1, "cpus_per_worker": 2}
        # created before the control plane knew the cluster: accepted, then its trial fails
        early_id = replica.client().create_study(synthetic("early", resources=too_big)).id
        server.start()
        client = server.client()
        early = client.study(early_id)
        finished(early, timeout=90)  # bounded: never "running" forever
        (trial,) = early.trials()
        trial = client.trial(trial.id)
        assert trial.state == "failed" and trial.attempts == 1
        assert "resources.cpus_per_worker" in trial.error
        assert "the largest of its 2 node(s) has 1" in trial.error
        assert any(e.detail.startswith("[deterministic]") for e in trial.events)

        # the cluster is known now: the same spec is refused at creation, naming the field,
        # by either replica
        for served in (server, replica):
            with served.http() as http:
                refused = http.post("/api/v1/studies", json=synthetic("late", resources=too_big))
            assert refused.status_code == 422, refused.text
            assert refused.json()["field"] == "resources.cpus_per_worker"
            assert "no node" in refused.json()["message"]
        with replica.http() as http:
            three = {"workers_per_trial": 3, "cpus_per_worker": 1}
            refused = http.post("/api/v1/studies", json=synthetic("three", resources=three))
        assert refused.status_code == 422, refused.text
        assert refused.json()["field"] == "resources.workers_per_trial"

        # two 1-CPU ranks: one on each node, gloo across them
        ddp = client.create_study(synthetic("across"))
        finished(ddp, timeout=120)
        (trial,) = ddp.trials()
        trial = client.trial(trial.id)
        assert trial.state == "complete", trial.error
        ranks = trial.placement["ranks"]
        assert trial.placement["world_size"] == 2
        assert len({r["node_id"] for r in ranks}) == 2
    finally:
        replica.stop()
        server.stop()
