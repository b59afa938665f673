"""The Ray executor on a real local Ray, without a control plane: one attempt of a trial at a
time, even against an attempt that an earlier control plane launched and this one never
tracked; cancel kills the rank's process; shutdown leaves no Ray process behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hpo.service.executor import AttemptLaunch, AttemptRef, AttemptState, AttemptStatus
from hpo.service.ray_executor import RayExecutor
from tests.conftest import wait_for

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def executor() -> Iterator[RayExecutor]:
    executor = RayExecutor(num_cpus=2, object_store_mb=128)
    executor.start()
    children = psutil.Process().children(recursive=True)
    try:
        yield executor
    finally:
        executor.shutdown()
        _, alive = psutil.wait_procs(children, timeout=30)
        assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


def slow_attempt(trial_id: int, attempt: int, tmp_path: Path) -> AttemptLaunch:
    return AttemptLaunch(
        trial_id=trial_id,
        study_id=1,
        number=0,
        attempt=attempt,
        trainable="synthetic",
        config={"steps": 500, "step_s": 0.2},
        params={"x": 0.5},
        workers=1,
        cpus_per_worker=1,
        gpus_per_worker=0,
        api_url="http://127.0.0.1:9",  # no control plane: the reporter keeps its points
        token=None,
        objectives=[("loss", "minimize")],
        keep_metrics=["loss"],
        checkpoint_dir=str(tmp_path / f"trial-{trial_id}"),
        lease_s=30,
    )


def placed(status: AttemptStatus | None) -> int | None:
    """The pid of rank 0 once the attempt runs."""
    if status is None or status.state != AttemptState.RUNNING or not status.placements:
        return None
    return status.placements[0].pid


def status_of(executor: RayExecutor, ref: AttemptRef) -> AttemptStatus | None:
    return next((s for s in executor.statuses() if s.ref == ref), None)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_attempt_n_cancels_an_older_attempt_it_never_tracked(
    executor: RayExecutor, tmp_path: Path
) -> None:
    import ray

    from hpo.workers.runner import DISPATCHER

    old = slow_attempt(7, 1, tmp_path)
    # launched by an earlier control plane: the dispatcher runs it, this executor does not know
    dispatcher = ray.get_actor(DISPATCHER, namespace=os.environ.get("HPO_RAY_NAMESPACE", "hpo"))
    ray.get(dispatcher.start.remote(old), timeout=60)
    old_pid = wait_for(
        lambda: placed(ray.get(dispatcher.status.remote([old.ref]))[old.ref]), 120, "attempt 1"
    )
    assert executor.statuses() == []

    new = slow_attempt(7, 2, tmp_path)
    executor.launch(new)
    assert ray.get(dispatcher.status.remote([old.ref]))[old.ref] is None  # cancelled, forgotten
    wait_for(lambda: gone(old_pid), 60, "attempt 1's rank to be killed")
    new_pid = wait_for(lambda: placed(status_of(executor, new.ref)), 120, "attempt 2")
    assert new_pid != old_pid and not gone(new_pid)

    executor.launch(new)  # launching it again runs it once
    assert [s.ref for s in executor.statuses()] == [new.ref]
    assert placed(status_of(executor, new.ref)) == new_pid

    executor.cancel(new.ref)
    assert executor.statuses() == []
    wait_for(lambda: gone(new_pid), 60, "attempt 2's rank to be killed")


def test_the_node_table_gives_each_node_its_total_resources(executor: RayExecutor) -> None:
    (node,) = executor.nodes()
    assert node.alive and node.node_id and node.node_ip
    assert node.resources["CPU"] == 2.0  # the total, whatever runs now


def test_rank_task_names_carry_the_deployment() -> None:
    from hpo.workers.runner import rank_task_name

    ref = AttemptRef(7, 2)
    assert rank_task_name("0a1b2c", ref, 1) == "hpo-0a1b2c-trial-7-attempt-2-rank-1"
    assert rank_task_name(None, ref, 0) == "hpo-trial-7-attempt-2-rank-0"
