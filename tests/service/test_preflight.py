"""The node preflight as the scheduler drives it, on a real database with the in-memory executor:
every node is checked once it is seen, a failure is kept per node and stored for every replica,
a node that never runs it fails within its timeout, a joining node is checked, a node that
leaves is forgotten, and a failed node is checked again."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hpo.service.executor import ClusterNode, PreflightRequest
from hpo.service.preflight import ClusterPreflight, config_warnings, failure_lines
from hpo.service.scheduler import Scheduler
from hpo.service.settings import Settings
from hpo.service.storage import meta
from hpo.service.studies import StudyService
from tests.conftest import wait_for
from tests.service.fake_executor import FakeCluster, FakeExecutor


def setup(
    service: StudyService, tmp_path: Path, cluster: FakeCluster, **kw: float
) -> tuple[Scheduler, FakeExecutor, ClusterPreflight]:
    executor = FakeExecutor(cluster)
    request = PreflightRequest(str(tmp_path), "http://127.0.0.1:1", "dep", timeout_s=0.05)
    preflight = ClusterPreflight(service.storage, request, **kw)
    scheduler = Scheduler(
        service,
        executor,
        api_url="http://127.0.0.1:1",
        token=None,
        checkpoint_dir=tmp_path,
        preflight=preflight,
        nodes_refresh_s=0.0,
    )
    return scheduler, executor, preflight


def stored(service: StudyService) -> dict:
    report = meta.preflight_report(service.storage)
    assert report is not None
    return report


def test_every_node_is_checked_at_start_without_a_study(
    service: StudyService, tmp_path: Path
) -> None:
    nodes = [ClusterNode("a", "10.0.0.1"), ClusterNode("b", "10.0.0.2")]
    scheduler, executor, _ = setup(service, tmp_path, FakeCluster(nodes=nodes))
    scheduler.tick()  # connects (no study needs it) and starts both preflights
    assert executor.started and sorted(executor.preflighted) == ["a", "b"]
    scheduler.tick()
    report = stored(service)
    assert report["state"] == "ok"
    assert [(n["node_id"], n["state"]) for n in report["nodes"]] == [("a", "ok"), ("b", "ok")]
    scheduler.tick()
    assert sorted(executor.preflighted) == ["a", "b"]  # a passed node is not checked again


def test_a_failed_node_is_stored_logged_and_checked_again(
    service: StudyService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = [ClusterNode("a", "10.0.0.1"), ClusterNode("b", "10.0.0.2")]
    cluster = FakeCluster(nodes=nodes, broken={"b": {"storage": "cannot write /x"}})
    scheduler, executor, _ = setup(service, tmp_path, cluster, recheck_s=0.0)
    with caplog.at_level(logging.ERROR, logger="hpo.preflight"):
        scheduler.tick()
        scheduler.tick()
    report = stored(service)
    assert report["state"] == "failed"
    assert failure_lines(report) == [
        {"node_id": "b", "node_ip": "10.0.0.2", "check": "storage", "message": "cannot write /x"}
    ]
    assert any("node b (10.0.0.2): storage check failed" in r.message for r in caplog.records)
    cluster.broken.clear()  # fixed: the re-check clears it
    scheduler.tick()
    scheduler.tick()
    assert executor.preflighted.count("b") >= 2 and executor.preflighted.count("a") == 1
    assert stored(service)["state"] == "ok"


def test_a_node_that_never_runs_it_fails_within_its_timeout(
    service: StudyService, tmp_path: Path
) -> None:
    cluster = FakeCluster(nodes=[ClusterNode("a", "10.0.0.1")], stuck={"a"})
    scheduler, _, _ = setup(service, tmp_path, cluster)
    scheduler.tick()
    assert stored(service)["state"] == "pending"

    def ticked() -> bool:
        scheduler.tick()
        return stored(service)["state"] != "pending"

    wait_for(ticked, 30, "the preflight's timeout")
    (line,) = failure_lines(stored(service))
    assert line["check"] == "schedule"
    assert "node a did not run the preflight within" in line["message"]


def test_joining_nodes_are_checked_and_leaving_ones_forgotten(
    service: StudyService, tmp_path: Path
) -> None:
    cluster = FakeCluster(nodes=[ClusterNode("a", "10.0.0.1")])
    scheduler, executor, _ = setup(service, tmp_path, cluster)
    scheduler.tick()
    scheduler.tick()
    cluster.nodes.append(ClusterNode("c", "10.0.0.3"))
    cluster.broken["c"] = {"control-plane": "cannot reach http://127.0.0.1:1/livez"}
    scheduler.tick()
    scheduler.tick()
    assert executor.preflighted == ["a", "c"]
    assert [line["node_id"] for line in failure_lines(stored(service))] == ["c"]
    cluster.nodes.pop()  # the failed node leaves: nothing is wrong any more
    scheduler.tick()
    report = stored(service)
    assert report["state"] == "ok" and [n["node_id"] for n in report["nodes"]] == ["a"]


def test_a_cluster_that_cannot_be_reached_is_a_stored_failure(
    service: StudyService, tmp_path: Path
) -> None:
    class Unreachable(FakeExecutor):
        def start(self) -> None:
            raise ConnectionError("no GCS at 10.9.9.9:6379")

    request = PreflightRequest(str(tmp_path), "http://127.0.0.1:1", "dep")
    preflight = ClusterPreflight(service.storage, request)
    scheduler = Scheduler(
        service,
        Unreachable(),
        api_url="http://127.0.0.1:1",
        token=None,
        checkpoint_dir=tmp_path,
        preflight=preflight,
        nodes_refresh_s=0.0,
    )
    with pytest.raises(ConnectionError):
        scheduler.tick()
    (line,) = failure_lines(stored(service))
    assert line["check"] == "cluster" and "no GCS at 10.9.9.9:6379" in line["message"]


def test_a_server_without_a_cluster_removes_a_stale_report(
    service: StudyService, tmp_path: Path
) -> None:
    meta.store_preflight(service.storage, {"state": "failed", "nodes": []})
    scheduler = Scheduler(
        service,
        FakeExecutor(),
        api_url="http://127.0.0.1:1",
        token=None,
        checkpoint_dir=tmp_path,
        preflight=ClusterPreflight(service.storage, None),
    )
    scheduler.tick()
    assert meta.preflight_report(service.storage) is None


def test_cluster_settings_that_break_a_cluster_are_warned_about(tmp_path: Path) -> None:
    assert config_warnings(Settings(data_dir=tmp_path)) == []
    bare = config_warnings(Settings(data_dir=tmp_path, ray_address="10.0.0.1:6379"))
    assert [w.split(":")[0] for w in bare] == [
        "HPO_RAY_ADDRESS is set without HPO_STORAGE_PATH",
        "HPO_RAY_ADDRESS is set without HPO_PUBLIC_URL",
    ]
    assert "http://127.0.0.1:8000" in bare[1]
    full = Settings(
        data_dir=tmp_path,
        ray_address="10.0.0.1:6379",
        storage_path=str(tmp_path),
        public_url="http://cp:8000",
    )
    assert config_warnings(full) == []


def test_a_control_plane_storage_failure_clears_once_the_storage_is_back(
    service: StudyService, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    root.write_text("not a folder yet")  # the storage cannot be written when the lease is taken
    nodes = [ClusterNode("a", "10.0.0.1")]
    executor = FakeExecutor(FakeCluster(nodes=nodes))
    request = PreflightRequest(str(root), "http://127.0.0.1:1", "dep", timeout_s=0.05)
    preflight = ClusterPreflight(service.storage, request, recheck_s=0.0)
    scheduler = Scheduler(
        service,
        executor,
        api_url="http://127.0.0.1:1",
        token=None,
        checkpoint_dir=tmp_path,
        preflight=preflight,
        nodes_refresh_s=0.0,
    )
    scheduler.tick()
    scheduler.tick()
    assert [line["check"] for line in failure_lines(stored(service))] == ["storage"]
    root.unlink()
    root.mkdir()  # the mount is back: the failure must not stay until the next leader
    scheduler.tick()
    scheduler.tick()
    report = stored(service)
    assert report["state"] == "ok" and report["storage_error"] is None
    assert preflight.request is not None and preflight.request.shared_marker is not None


def test_a_failed_node_whose_clock_runs_ahead_is_checked_again(
    service: StudyService, tmp_path: Path
) -> None:
    """A node stamps its result with its own clock; one an hour ahead of the control plane
    (no NTP: the clusters the preflight is for) must still be checked again once fixed."""
    cluster = FakeCluster(
        nodes=[ClusterNode("a", "10.0.0.1")],
        broken={"a": {"storage": "cannot write /x"}},
        clock_ahead_s={"a": 3600.0},
    )
    scheduler, executor, _ = setup(service, tmp_path, cluster, recheck_s=0.0)
    scheduler.tick()
    scheduler.tick()
    assert stored(service)["state"] == "failed"
    cluster.broken.clear()
    scheduler.tick()
    scheduler.tick()
    assert executor.preflighted.count("a") >= 2
    assert stored(service)["state"] == "ok"


def test_a_preflight_in_flight_when_the_marker_is_written_again_does_not_count(
    service: StudyService, tmp_path: Path
) -> None:
    """A node's preflight started while the marker could not be written checks no marker;
    if its result arrives after the marker is written again it must not stand as the node's
    outcome (the node would never be checked against the marker)."""
    root = tmp_path / "store"
    root.write_text("not a folder yet")
    executor = FakeExecutor(FakeCluster(nodes=[ClusterNode("a", "10.0.0.1")]))
    request = PreflightRequest(str(root), "http://127.0.0.1:1", "dep", timeout_s=5)
    preflight = ClusterPreflight(service.storage, request, recheck_s=0.0)
    scheduler = Scheduler(
        service,
        executor,
        api_url="http://127.0.0.1:1",
        token=None,
        checkpoint_dir=tmp_path,
        preflight=preflight,
        nodes_refresh_s=0.0,
    )
    scheduler.tick()  # the marker fails; node a's preflight starts without one
    root.unlink()
    root.mkdir()
    scheduler.tick()  # the marker is written; a's first result arrives now
    scheduler.tick()
    assert executor.preflighted.count("a") == 2
    assert stored(service)["state"] == "ok"
