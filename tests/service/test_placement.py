"""Placement per node: a trial whose rank fits no node is refused (at creation when the cluster
is known, else failed by the scheduler with the reason), and one that fits a node but not what
is free now waits. The scheduler runs on a real database with the in-memory executor."""

from __future__ import annotations

import time
import typing
from pathlib import Path

import pytest

from hpo.service import executor, placement, records
from hpo.service.errors import InvalidInput
from hpo.service.executor import ClusterNode
from hpo.service.scheduler import Scheduler
from hpo.service.spec import Resources, StudySpec
from hpo.service.storage import meta
from hpo.service.studies import StudyService
from tests.service.fake_executor import FakeCluster, FakeExecutor
from tests.service.test_scheduler import create, make_scheduler

ONE_CPU = {"CPU": 1.0}


def test_the_rank_placement_ranks_send_is_the_one_the_api_shows() -> None:
    """A rank sends a RankPlacement dataclass; the API's trial record declares the same
    fields as a TypedDict. The two are declared apart (the workers import no API models), so
    this keeps them in step: the same names, in the same order, with the same types."""
    sent = typing.get_type_hints(executor.RankPlacement)
    shown = typing.get_type_hints(records.RankPlacement)
    assert list(sent.items()) == list(shown.items())


def nodes(*shapes: dict[str, float], down: int = 0) -> list[ClusterNode]:
    """Nodes of these shapes; the last ``down`` of them are down."""
    return [
        ClusterNode(f"n{i}", f"10.0.0.{i}", dict(shape), alive=i < len(shapes) - down)
        for i, shape in enumerate(shapes)
    ]


def resources(workers: int = 1, cpus: float = 1, gpus: float = 0) -> Resources:
    return Resources(workers_per_trial=workers, cpus_per_worker=cpus, gpus_per_worker=gpus)


@pytest.mark.parametrize(
    ("need", "field"),
    [
        (resources(cpus=2), "resources.cpus_per_worker"),
        (resources(gpus=1), "resources.gpus_per_worker"),
        (resources(workers=3), "resources.workers_per_trial"),
    ],
)
def test_a_rank_that_fits_no_node_names_the_field(need: Resources, field: str) -> None:
    problem = placement.placement_problem(need, nodes(ONE_CPU, ONE_CPU))
    assert problem is not None and problem.field == field
    assert problem.message.startswith(field + ":") and "2 node(s)" in problem.message


def test_ranks_that_fit_the_nodes_totals_are_no_problem() -> None:
    cluster = nodes({"CPU": 1.0}, {"CPU": 4.0, "GPU": 2.0})
    assert placement.placement_problem(resources(workers=2, cpus=1), cluster) is None
    assert placement.placement_problem(resources(workers=2, cpus=2, gpus=1), cluster) is None
    # the 4-CPU node holds two 2-CPU ranks; a third needs another such node
    assert placement.placement_problem(resources(workers=3, cpus=2), cluster).field == (
        "resources.workers_per_trial"
    )
    # CPUs on one node and GPUs on another: no single node holds the rank
    split = nodes({"CPU": 8.0}, {"CPU": 1.0, "GPU": 1.0})
    assert placement.placement_problem(resources(cpus=2, gpus=1), split).field == "resources"
    assert placement.placement_problem(resources(cpus=64), []) is None  # unknown cluster


def test_a_node_that_is_down_still_counts_so_its_ranks_wait_for_it() -> None:
    cluster = nodes({"CPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}, down=1)
    assert not cluster[1].alive
    assert placement.placement_problem(resources(gpus=1), cluster) is None


def test_the_snapshot_round_trips_and_goes_stale() -> None:
    cluster = nodes({"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 8.0, "GPU": 2.0})
    text = placement.encode(cluster, at=1000.0)
    back = placement.decode(text, now=1000.0 + placement.SNAPSHOT_MAX_AGE_S - 1)
    assert back is not None and placement.fingerprint(back) == placement.fingerprint(cluster)
    assert placement.decode(text, now=1000.0 + placement.SNAPSHOT_MAX_AGE_S + 1) is None
    assert placement.decode("not json") is None and placement.decode(None) is None
    many = nodes(*({"CPU": float(c)} for c in range(1, 600)))  # meta.value is Text
    assert placement.fingerprint(placement.decode(placement.encode(many, at=1.0), now=1.0)) == (
        placement.fingerprint(many)
    )


@pytest.fixture
def small_cluster() -> FakeExecutor:
    """Two 1-CPU nodes: 2 CPUs free in all, but no node holds a 2-CPU rank."""
    return FakeExecutor(FakeCluster(capacity={"CPU": 2.0}, nodes=nodes(ONE_CPU, ONE_CPU)))


def big_rank(service: StudyService, name: str, max_trials: int = 3) -> int:
    return create(
        service,
        name,
        budget={"max_trials": max_trials},
        resources={"workers_per_trial": 1, "cpus_per_worker": 2},
    )


def test_a_rank_larger_than_every_node_fails_its_trial_instead_of_waiting(
    service: StudyService, small_cluster: FakeExecutor, tmp_path: Path
) -> None:
    scheduler = make_scheduler(service, small_cluster, tmp_path)
    study = big_rank(service, "too-big")  # before any snapshot: accepted
    scheduler.tick()
    assert small_cluster.launched == []
    (failed,) = service.storage.list_trials(study)[0]
    trial = service.storage.get_trial(failed.id)
    assert trial.state == "failed" and trial.attempts == 1  # deterministic: never retried
    assert "resources.cpus_per_worker" in trial.error and "no node" in trial.error
    assert trial.events[-1].detail.startswith("[deterministic]")
    scheduler.tick()  # the same nodes: the study's other trials are not burnt as well
    assert len(service.storage.list_trials(study)[0]) == 1
    assert service.storage.get_study(study).state == "running"
    # the nodes are replaced by one that can hold the rank: the study launches again
    small_cluster.cluster.nodes = nodes({"CPU": 2.0})
    scheduler._nodes_read_at = -1e9  # read the nodes now rather than in NODES_REFRESH_S
    scheduler.tick()
    assert len(small_cluster.launched) == 1


def test_a_rank_that_fits_a_node_but_not_now_waits(
    service: StudyService, small_cluster: FakeExecutor, tmp_path: Path
) -> None:
    scheduler = make_scheduler(service, small_cluster, tmp_path)
    study = create(service, "waits", budget={"max_trials": 3})
    scheduler.tick()
    first = list(small_cluster.launched)
    assert len(first) == 2
    for ref in first:
        small_cluster.place(ref)
    scheduler.tick()  # both CPUs are taken: the third trial waits, it is not failed
    assert small_cluster.launched == first
    assert all(t.state != "failed" for t in service.storage.list_trials(study)[0])
    small_cluster.finish(first[0], loss=1.0)
    scheduler.tick()
    assert len(small_cluster.launched) == 3


def test_an_unknown_cluster_refuses_nothing(service: StudyService, tmp_path: Path) -> None:
    executor = FakeExecutor(FakeCluster(capacity={"CPU": 2.0}, nodes_unknown=True))
    scheduler = make_scheduler(service, executor, tmp_path)
    big_rank(service, "unknown", max_trials=1)
    scheduler.tick()
    assert len(executor.launched) == 1  # Ray judges it (as before)
    assert placement.known_nodes(service.storage) is None


def test_creation_is_refused_once_the_scheduler_published_the_nodes(
    service: StudyService, small_cluster: FakeExecutor, tmp_path: Path
) -> None:
    scheduler: Scheduler = make_scheduler(service, small_cluster, tmp_path)
    create(service, "fits", budget={"max_trials": 1})
    scheduler.tick()  # starts the executor, reads and publishes the nodes
    known = placement.known_nodes(service.storage)
    assert known is not None and placement.fingerprint(known) == ((((1.0, 0.0), 2)),)
    with pytest.raises(InvalidInput) as refused:
        big_rank(service, "too-big")
    assert refused.value.field == "resources.cpus_per_worker"
    ask_tell = StudySpec.model_validate(
        {
            "name": "ask-tell",
            "objective": {"metric": "loss", "direction": "minimize"},
            "resources": {"cpus_per_worker": 2},
            "space": {"x": {"type": "float", "low": 0, "high": 1}},
        }
    )
    service.create_study(ask_tell)  # no trainable: nothing is placed on the cluster
    # a stale snapshot (its leader is gone) says nothing: accepted, the scheduler judges
    stale = placement.encode(small_cluster.nodes(), at=time.time() - 2 * 3600)
    meta.put(service.storage, placement.SNAPSHOT_KEY, stale)
    big_rank(service, "accepted")


def test_a_restarted_leader_does_not_refuse_by_the_snapshot_of_its_previous_cluster(
    service: StudyService, small_cluster: FakeExecutor, tmp_path: Path
) -> None:
    """A server restarted on another cluster (a local Ray with more CPUs, a new cluster
    address) while no study runs starts no executor, so it reads no nodes: the snapshot the
    previous run published must not refuse what the new cluster holds."""
    before = make_scheduler(service, small_cluster, tmp_path)
    study = create(service, "fits", budget={"max_trials": 1})
    before.tick()  # publishes two 1-CPU nodes
    small_cluster.finish(small_cluster.launched[0], loss=1.0)
    before.tick()
    assert service.storage.get_study(study).state == "completed"
    before.release()  # stopped; restarted with a larger cluster
    bigger = FakeExecutor(FakeCluster(capacity={"CPU": 4.0}, nodes=nodes({"CPU": 4.0})))
    after = make_scheduler(service, bigger, tmp_path)
    after.tick()  # leads; nothing runs, so its executor is not started yet
    assert after.leading and not bigger.started
    big_rank(service, "fits-now")  # accepted: 4 CPUs on one node
    after.tick()
    assert len(bigger.launched) == 2  # two 2-CPU ranks on the 4-CPU node
