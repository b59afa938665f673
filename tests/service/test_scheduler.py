"""The scheduler's decisions on a real database, with an in-memory executor instead of Ray:
what it launches, in which order, what it tells or retries, and what it cancels."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from hpo.service import scheduler as scheduler_module
from hpo.service.executor import (
    AttemptError,
    AttemptRef,
    AttemptState,
    EvaluationResult,
    Executor,
    FailureClass,
)
from hpo.service.records import MetricInput
from hpo.service.scheduler import Scheduler
from hpo.service.spec import StudySpec
from hpo.service.storage import meta
from hpo.service.studies import StudyService
from tests.conftest import simple_spec, wait_for
from tests.service.fake_executor import FakeCluster, FakeExecutor


@pytest.fixture
def executor() -> FakeExecutor:
    return FakeExecutor(FakeCluster(capacity={"CPU": 4.0}))


def make_scheduler(
    service: StudyService, executor: Executor, tmp_path: Path, **kw: float
) -> Scheduler:
    return Scheduler(
        service, executor, api_url="http://127.0.0.1:1", token=None, checkpoint_dir=tmp_path, **kw
    )


@pytest.fixture
def scheduler(service: StudyService, executor: FakeExecutor, tmp_path: Path) -> Scheduler:
    return make_scheduler(service, executor, tmp_path)


def create(service: StudyService, name: str, **over: object) -> int:
    spec = simple_spec(
        name,
        budget={"max_trials": 8},
        resources={"workers_per_trial": 1, "cpus_per_worker": 1},
        trainable={"name": "synthetic", "config": {"steps": 3}},
    )
    spec.update(over)
    return service.create_study(StudySpec.model_validate(spec)).id


def launched_by_study(service: StudyService, executor: FakeExecutor) -> dict[int, int]:
    counts: dict[int, int] = {}
    for ref in executor.launched:
        study_id = service.storage.get_trial(ref.trial_id, events=False).study_id
        counts[study_id] = counts.get(study_id, 0) + 1
    return counts


def test_launches_up_to_max_concurrent(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler
) -> None:
    create(service, "capped", budget={"max_trials": 8, "max_concurrent": 3})
    scheduler.tick()
    assert len(executor.launched) == 3
    scheduler.tick()
    assert len(executor.launched) == 3
    assert executor.started


def test_a_launch_keeps_the_objective_pruned_and_constraint_metrics_through_an_outage(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler
) -> None:
    """The reporter drops other metrics first when the control plane stays away: the ones
    the study judges a trial by are kept, its constraints' too (feasibility was judged on
    a stale value when their last points were dropped)."""
    create(service, "kept", budget={"max_trials": 1}, constraints=["latency_ms <= 10"])
    scheduler.tick()
    (ref,) = executor.launched
    assert executor.launch_of[ref].keep_metrics == ["latency_ms", "loss"]


def test_launches_only_what_the_cluster_has_room_for(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler
) -> None:
    create(service, "big", resources={"workers_per_trial": 2, "cpus_per_worker": 1})
    scheduler.tick()
    first = list(executor.launched)
    assert len(first) == 2  # 4 CPUs, 2 per trial
    scheduler.tick()  # still pending: what they will claim is not free
    assert executor.launched == first
    for ref in first:
        executor.place(ref, workers=2)
    scheduler.tick()  # placed: they occupy the cluster
    assert executor.launched == first
    executor.finish(first[0], loss=1.0)
    scheduler.tick()
    assert len(executor.launched) == 3 and first[0] not in executor.tracked


def test_studies_take_turns_for_the_cluster(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler
) -> None:
    a = create(service, "first")
    b = create(service, "second")
    scheduler.tick()
    assert launched_by_study(service, executor) == {a: 2, b: 2}
    # the study with fewer trials in flight gets the next free slot
    ended = next(
        r for r in executor.launched if service.storage.get_trial(r.trial_id).study_id == a
    )
    executor.finish(ended, loss=0.5)
    scheduler.tick()
    assert launched_by_study(service, executor) == {a: 3, b: 2}


def test_a_finished_attempt_is_told_with_its_placement_and_checkpoint(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler
) -> None:
    create(service, "told", budget={"max_trials": 1})
    scheduler.tick()
    (ref,) = executor.launched
    executor.place(ref)
    executor.checkpoint(ref, "/data/trial/attempt-1/checkpoint-3", 3)
    scheduler.tick()
    trial = service.storage.get_trial(ref.trial_id)
    assert trial.state == "running"
    assert trial.placement["executor"] == "fake" and trial.placement["world_size"] == 1
    assert trial.placement["attempt"] == 1
    assert [r["pid"] for r in trial.placement["ranks"]] == [1000]
    assert service.storage.trial_checkpoint(ref.trial_id) == "/data/trial/attempt-1/checkpoint-3"
    executor.finish(ref, loss=0.25)
    scheduler.tick()
    trial = service.storage.get_trial(ref.trial_id)
    assert trial.state == "complete" and trial.value == 0.25
    assert executor.tracked == set() and executor.cancelled == []
    assert scheduler.in_flight == {}


def test_points_an_attempt_could_not_deliver_as_it_ended_are_stored_before_the_tell(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler
) -> None:
    """The control plane was away as the attempt ended: its reporter closed with points
    unsent, which rank 0 returns with its result; they are stored under that attempt, once,
    before the trial is told (the attempt is over: nothing would send them again)."""
    create(service, "late-points", budget={"max_trials": 1})
    scheduler.tick()
    (ref,) = executor.launched
    executor.place(ref)
    service.report(ref.trial_id, [MetricInput(0, "loss", 1.0)], attempt=1)
    unsent = [{"step": 1, "name": "loss", "value": 0.5}, {"step": 2, "name": "loss", "value": 0.25}]
    executor.finish(ref, unsent=unsent, loss=0.25)
    scheduler.tick()
    trial = service.storage.get_trial(ref.trial_id)
    assert trial.state == "complete" and trial.value == 0.25
    points = service.storage.metrics(ref.trial_id)
    assert [(p.step, p.value, p.attempt) for p in points] == [
        (0, 1.0, 1),
        (1, 0.5, 1),
        (2, 0.25, 1),
    ]


def test_an_attempt_without_the_objective_metric_fails_without_retry(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler
) -> None:
    create(service, "no-metric", budget={"max_trials": 1}, max_retries=2)
    scheduler.tick()
    (ref,) = executor.launched
    executor.finish(ref, accuracy=0.9)
    scheduler.tick()
    trial = service.storage.get_trial(ref.trial_id)
    assert trial.state == "failed" and trial.attempts == 1
    assert "never reported the objective metric 'loss'" in trial.error


def test_a_failed_attempt_is_retried_and_a_trainable_error_is_not(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler
) -> None:
    create(service, "retried", budget={"max_trials": 1}, max_retries=3)
    scheduler.tick()
    (first,) = executor.launched
    crash = AttemptError("WorkerDied", "WorkerDied: the rank's process exited")
    executor.fail(first, crash)
    scheduler.tick()  # the failure is recorded and the retry launched in the same tick
    second = AttemptRef(first.trial_id, 2)
    assert executor.launched == [first, second]
    trial = service.storage.get_trial(first.trial_id)
    assert trial.state == "running" and trial.attempts == 2
    assert any("attempt 1: WorkerDied" in (e.detail or "") for e in trial.events)
    bad = AttemptError(
        "TrainableError", "TrainableError: bad data", retryable=False, traceback="Traceback ..."
    )
    executor.fail(second, bad)
    scheduler.tick()
    trial = service.storage.get_trial(first.trial_id)
    assert trial.state == "failed" and trial.attempts == 2
    assert trial.error == "TrainableError: bad data\nTraceback ..."
    assert executor.launched == [first, second]


def test_a_lost_attempt_is_retried_without_spending_max_retries(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler
) -> None:
    create(service, "lost", budget={"max_trials": 1})  # max_retries: 0
    scheduler.tick()
    (ref,) = executor.launched
    executor.lose(ref)
    status = executor.statuses()[0]
    assert status.state == AttemptState.LOST
    assert status.error.failure_class == FailureClass.INFRASTRUCTURE
    scheduler.tick()  # recorded as an infrastructure loss, and attempt 2 launched
    trial = service.storage.get_trial(ref.trial_id)
    assert trial.state == "running" and trial.attempts == 2 and "does not know" in trial.error
    assert any((e.detail or "").startswith("[infrastructure] attempt 1:") for e in trial.events)
    assert list(scheduler.in_flight) == [AttemptRef(ref.trial_id, 2)]


@pytest.mark.parametrize("how", ["stop", "delete"])
def test_stopping_or_deleting_a_study_cancels_its_attempts(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler, how: str
) -> None:
    study_id = create(service, "ended", budget={"max_trials": 8, "max_concurrent": 2})
    other = create(service, "other", budget={"max_trials": 1})
    scheduler.tick()
    mine = [
        r for r in executor.launched if service.storage.get_trial(r.trial_id).study_id == study_id
    ]
    assert len(mine) == 2
    for ref in executor.launched:
        executor.place(ref)
    if how == "stop":
        service.update_study(study_id, state="stopped")
    else:
        service.delete_study(study_id)
    scheduler.tick()
    assert sorted(executor.cancelled) == sorted(mine)
    assert executor.cluster.live() == [r for r in executor.launched if r not in mine]
    assert {service.storage.get_trial(r.trial_id).study_id for r in scheduler.in_flight} == {other}


def test_a_pruned_trial_keeps_running_for_a_grace_period_then_is_cancelled(
    service: StudyService,
    executor: FakeExecutor,
    scheduler: Scheduler,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scheduler_module, "PRUNED_GRACE_S", 0.5)
    create(service, "pruned", budget={"max_trials": 2})
    scheduler.tick()
    slow, quick = executor.launched
    for ref in (slow, quick):
        executor.place(ref)
        service.tell(ref.trial_id, state="pruned")
    scheduler.tick()  # within the grace: it may still be saving its last checkpoint
    assert executor.cancelled == []
    executor.finish(quick, loss=3.0)  # ends on its own within the grace: released
    time.sleep(0.6)
    scheduler.tick()
    assert executor.cancelled == [slow]
    assert quick not in executor.tracked and executor.cluster.live() == []
    assert (
        service.storage.get_trial(quick.trial_id).state == "pruned"
    )  # its late result changes nothing


def test_launching_attempt_n_cancels_the_older_attempt_first(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler
) -> None:
    create(service, "expired", budget={"max_trials": 1}, max_retries=1, lease_s=0.5)
    scheduler.tick()
    (first,) = executor.launched
    executor.place(first)  # placed: its (frozen) reporter alone would renew the lease
    time.sleep(0.7)
    # the scheduler's own ask expires the lease and claims the requeued trial in one call
    scheduler.tick()
    second = AttemptRef(first.trial_id, 2)
    assert executor.launched == [first, second]
    assert executor.cancelled == [first]
    assert executor.cluster.live(first.trial_id) == [second]
    assert list(scheduler.in_flight) == [second]
    executor.place(second)
    executor.finish(second, loss=0.1)
    scheduler.tick()
    trial = service.storage.get_trial(first.trial_id)
    assert trial.state == "complete" and trial.attempts == 2 and trial.value == 0.1


def test_a_new_scheduler_adopts_what_the_cluster_still_runs(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler, tmp_path: Path
) -> None:
    create(service, "adopted", budget={"max_trials": 2})
    scheduler.tick()
    kept, gone = executor.launched
    executor.place(kept)
    executor.lose(gone)
    # the control plane restarts (its scheduler lease ends); the cluster (shared) goes on
    scheduler.release()
    successor = FakeExecutor(executor.cluster)
    make_scheduler(service, successor, tmp_path).tick()
    retry = AttemptRef(gone.trial_id, 2)  # an infrastructure loss spends no retry
    assert successor.tracked == {kept, retry} and successor.launched == [retry]
    assert service.storage.get_trial(kept.trial_id).state == "running"
    lost = service.storage.get_trial(gone.trial_id)
    assert lost.state == "running" and lost.attempts == 2
    assert "lost when the control plane restarted" in lost.error


def test_the_best_trial_of_a_completed_study_is_evaluated_once(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler
) -> None:
    create(service, "evaluated", budget={"max_trials": 1})
    scheduler.tick()
    (ref,) = executor.launched
    executor.checkpoint(ref, "/data/best/checkpoint-3", 3)
    scheduler.tick()
    executor.finish(ref, loss=0.2)
    scheduler.tick()  # told: the study completes
    scheduler.tick()  # its best trial goes to evaluation
    scheduler.tick()
    (request,) = executor.requests
    assert request.trial_id == ref.trial_id and request.checkpoint == "/data/best/checkpoint-3"
    assert request.trainable == "synthetic" and request.config == {"steps": 3}
    executor.evaluated.append(EvaluationResult(ref.trial_id, metrics={"test_loss": 0.3}))
    scheduler.tick()
    assert service.storage.get_trial(ref.trial_id).test_metrics == {"test_loss": 0.3}


def test_a_completed_study_with_nothing_to_evaluate_is_read_once(
    service: StudyService, executor: FakeExecutor, scheduler: Scheduler
) -> None:
    """Each tick reads only studies that completed since: one without a checkpoint is looked
    at once, not on every tick (hundreds of completed studies made every tick slow)."""
    create(service, "no-checkpoint", budget={"max_trials": 1})
    scheduler.tick()
    (ref,) = executor.launched
    executor.finish(ref, loss=0.2)
    scheduler.tick()  # told: the study completes
    reads: list[int] = []
    best = service.storage.best

    def counted(study_id: int):
        reads.append(study_id)
        return best(study_id)

    service.storage.best = counted  # type: ignore[method-assign]
    for _ in range(3):
        scheduler.tick()
    assert reads == [service.storage.get_trial(ref.trial_id).study_id]
    assert executor.requests == []


def test_deployments_sharing_a_checkpoint_store_never_share_a_trial_folder(
    tmp_path: Path,
) -> None:
    """Two databases (two deployments on one cluster and one store, or a database wiped and
    started again on the same folder) both have a trial 1 of a study 1: its retry resumes
    from the checkpoints in its folder, so the folders must differ."""
    from hpo.service.db import make_engine, upgrade_schema
    from hpo.service.executor import AttemptLaunch
    from hpo.service.storage import Storage, meta

    class Recording(FakeExecutor):
        def __init__(self) -> None:
            super().__init__(FakeCluster(capacity={"CPU": 4.0}))
            self.launches: list[AttemptLaunch] = []

        def launch(self, launch: AttemptLaunch) -> None:
            self.launches.append(launch)
            super().launch(launch)

    store = tmp_path / "shared-checkpoints"
    folders = []
    for name in ("x", "y"):
        engine = make_engine(f"sqlite:///{tmp_path / f'{name}.db'}")
        upgrade_schema(engine)
        storage = Storage(engine)
        service = StudyService(storage)
        executor = Recording()
        scheduler = Scheduler(
            service,
            executor,
            api_url="http://127.0.0.1:1",
            token=None,
            checkpoint_dir=store,
            deployment=meta.deployment_id(storage),
        )
        create(service, "same", budget={"max_trials": 1})
        scheduler.tick()
        (launch,) = executor.launches
        assert (launch.study_id, launch.trial_id) == (1, 1)
        folders.append(Path(launch.checkpoint_dir))
        scheduler.release()
        engine.dispose()
    assert folders[0] != folders[1]
    assert all(f.is_relative_to(store) for f in folders)  # downloads still find them


def test_a_tick_that_keeps_failing_the_same_way_is_logged_once_then_its_recovery(
    service: StudyService,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scheduler_module, "START_RETRY_S", (0.0, 0.0))  # a start every tick

    class Unreachable(FakeExecutor):
        """A cluster that cannot be reached until ``reachable`` is set."""

        def __init__(self) -> None:
            super().__init__(FakeCluster(capacity={"CPU": 4.0}))
            self.tries = 0
            self.reachable = False

        def start(self) -> None:
            self.tries += 1
            if not self.reachable:
                raise ConnectionError("cannot reach the cluster at ray://unreachable:10001")
            super().start()

    executor = Unreachable()
    create(service, "needs-the-cluster")  # a running study with a trainable: each tick starts it
    scheduler = make_scheduler(service, executor, tmp_path, interval_s=0.01)
    with caplog.at_level("INFO", logger="hpo.scheduler"):
        scheduler.start()
        try:
            wait_for(lambda: executor.tries >= 30, timeout=30)
            executor.reachable = True
            wait_for(lambda: executor.started, timeout=30)
            wait_for(lambda: any("works again" in r.message for r in caplog.records), timeout=30)
        finally:
            scheduler.stop()
    failed = [r for r in caplog.records if "tick failed" in r.message]
    assert len(failed) == 1, [r.message for r in failed]  # not one traceback per tick
    assert failed[0].exc_info is not None and "ray://unreachable:10001" in caplog.text
    recovered = [r.message for r in caplog.records if "works again" in r.message]
    assert len(recovered) == 1 and int(recovered[0].split("after ")[1].split()[0]) >= 30


def test_a_start_that_keeps_failing_is_tried_again_later_and_later_and_noted(
    service: StudyService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Unstartable(FakeExecutor):
        def __init__(self) -> None:
            super().__init__(FakeCluster(capacity={"CPU": 4.0}))
            self.tried_at: list[float] = []
            self.startable = False

        def start(self) -> None:
            self.tried_at.append(time.monotonic())
            if not self.startable:
                raise RuntimeError("The current node timed out during startup.")
            super().start()

    executor = Unstartable()
    needs = create(service, "needs-ray")
    scheduler = make_scheduler(service, executor, tmp_path, interval_s=0.01)
    with caplog.at_level("INFO", logger="hpo.scheduler"):
        scheduler.start()
        try:
            wait_for(lambda: len(executor.tried_at) >= 3, timeout=30)
            note = meta.executor_failure(service.storage)
            assert note is not None and note["holder"] == scheduler.holder
            assert "RuntimeError: The current node timed out" in note["error"]
            assert note["tries"] >= 2 and note["next_try_in_s"] == 2 ** (note["tries"] - 1)
            assert not any("works again" in r.message for r in caplog.records)  # still failing
            # the study stops: nothing needs Ray any more, the note goes, no more tries
            service.update_study(needs, state="stopped")
            wait_for(lambda: meta.executor_failure(service.storage) is None, timeout=30)
            tries = len(executor.tried_at)
            time.sleep(1.5)
            assert len(executor.tried_at) == tries
            # a new study that needs Ray: tried at once (the count starts afresh), and it works
            executor.startable = True
            asked = time.monotonic()
            create(service, "needs-ray-again")
            wait_for(lambda: executor.started, timeout=30)
            assert executor.tried_at[-1] - asked < 1.0
            assert meta.executor_failure(service.storage) is None
        finally:
            scheduler.stop()
    executor.tried_at = executor.tried_at[:tries]
    gaps = [b - a for a, b in itertools.pairwise(executor.tried_at)]
    assert all(gap >= 2**i * 0.99 for i, gap in enumerate(gaps)), gaps  # 1, 2, 4 s...
