"""One scheduler per database, failure classes and deadlines, on a real database with the
in-memory executor: a second scheduler stands by and takes over (adopting what its
predecessor ran) only once the lease has expired; infrastructure losses spend no retry;
stalled, overlong and out-of-time trials end and their attempts are cancelled."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hpo.service.db.models import Trial
from hpo.service.executor import AttemptRef, FailureClass
from hpo.service.records import MetricInput
from hpo.service.scheduler import Scheduler
from hpo.service.storage import leases
from hpo.service.studies import StudyService
from hpo.service.transitions import MAX_INFRA_FAILURES
from tests.service.fake_executor import FakeCluster, FakeExecutor
from tests.service.test_scheduler import create


@pytest.fixture
def executor() -> FakeExecutor:
    return FakeExecutor(FakeCluster(capacity={"CPU": 4.0}))


def scheduler_of(
    service: StudyService, executor: FakeExecutor, tmp_path: Path, lease_s: float = 15.0
) -> Scheduler:
    return Scheduler(
        service,
        executor,
        api_url="http://127.0.0.1:1",
        token=None,
        checkpoint_dir=tmp_path,
        lease_s=lease_s,
    )


def row(service: StudyService, trial_id: int) -> Trial:
    with service.storage.read() as s:
        return s.get(Trial, trial_id)


def test_a_second_scheduler_stands_by_and_touches_nothing(
    service: StudyService, executor: FakeExecutor, tmp_path: Path
) -> None:
    create(service, "one", budget={"max_trials": 4, "max_concurrent": 2})
    first = scheduler_of(service, executor, tmp_path)
    first.tick()
    assert first.leading and len(executor.launched) == 2
    second_executor = FakeExecutor(executor.cluster)
    second = scheduler_of(service, second_executor, tmp_path)
    for _ in range(3):
        second.tick()
    assert not second.leading and not second_executor.started
    assert second_executor.launched == [] and second_executor.tracked == set()
    for ref in executor.launched:  # the first server's trials: running, owned by it
        assert service.storage.get_trial(ref.trial_id).state == "running"
        assert row(service, ref.trial_id).owner == first.holder
    lease = leases.get(service.storage, leases.SCHEDULER)
    assert lease is not None and (lease.holder, lease.epoch) == (first.holder, first.epoch)


def test_a_standby_takes_over_an_expired_lease_and_adopts_the_attempts(
    service: StudyService, executor: FakeExecutor, tmp_path: Path
) -> None:
    create(service, "failover", budget={"max_trials": 2})  # max_retries: 0
    first = scheduler_of(service, executor, tmp_path, lease_s=0.5)
    first.tick()
    kept, gone = executor.launched
    executor.place(kept)
    executor.lose(gone)  # its node went away with the first control plane
    time.sleep(0.7)  # the first server stopped renewing: its lease expires
    successor = FakeExecutor(executor.cluster)
    second = scheduler_of(service, successor, tmp_path)
    second.tick()
    assert second.leading and second.epoch == first.epoch + 1
    retry = AttemptRef(gone.trial_id, 2)
    assert successor.tracked == {kept, retry} and successor.launched == [retry]
    assert row(service, kept.trial_id).owner == second.holder
    lost = row(service, gone.trial_id)
    assert (lost.state, lost.attempts, lost.infra_failures) == ("running", 2, 1)
    assert lost.owner == second.holder
    # the first one wakes up: its lease is gone, so it launches nothing and lets go
    first.tick()
    assert not first.leading and first.in_flight == {} and not executor.started
    assert executor.launched == [kept, gone]


def test_released_lease_is_taken_at_once(
    service: StudyService, executor: FakeExecutor, tmp_path: Path
) -> None:
    first = scheduler_of(service, executor, tmp_path)
    first.tick()
    second = scheduler_of(service, FakeExecutor(executor.cluster), tmp_path)
    second.tick()
    assert not second.leading
    first.release()
    second.tick()
    assert second.leading


def test_failure_classes_decide_the_retry(service: StudyService) -> None:
    sid = create(service, "classes", budget={"max_trials": 2}, max_retries=1)
    t = service.ask(sid, dispatched=True)
    infra, trainable = FailureClass.INFRASTRUCTURE, FailureClass.TRAINABLE
    steps = [(infra, "waiting"), (trainable, "waiting"), (infra, "waiting"), (trainable, "failed")]
    for attempt, (kind, state) in enumerate(steps, start=1):
        record = service.fail_attempt(t.id, f"loss {attempt}", failure_class=kind)
        assert (record.state, record.attempts) == (state, min(attempt + 1, 4))
        if state == "waiting":
            assert service.ask(sid, dispatched=True).id == t.id
    # 2 infrastructure losses spent nothing; 2 trainable errors spent max_retries + 1 attempts
    assert row(service, t.id).infra_failures == 2
    details = [e.detail for e in service.storage.get_trial(t.id).events if e.state == "failed"]
    assert details == [
        "[infrastructure] attempt 1: loss 1; retrying",
        "attempt 2: loss 2; retrying",  # trainable: the usual, counted kind, untagged
        "[infrastructure] attempt 3: loss 3; retrying",
        "loss 4",
    ]
    u = service.ask(sid, dispatched=True)
    final = service.fail_attempt(u.id, "bad settings", failure_class=FailureClass.DETERMINISTIC)
    assert (final.state, final.attempts, final.error) == ("failed", 1, "bad settings")


def test_infrastructure_losses_are_capped(service: StudyService) -> None:
    sid = create(service, "capped-losses", budget={"max_trials": 1})  # max_retries: 0
    t = service.ask(sid, dispatched=True)
    for _ in range(MAX_INFRA_FAILURES):
        assert service.fail_attempt(t.id, "node lost", failure_class="infrastructure").state == (
            "waiting"
        )
        service.ask(sid, dispatched=True)
    last = service.fail_attempt(t.id, "node lost", failure_class=FailureClass.INFRASTRUCTURE)
    assert (last.state, last.attempts) == ("failed", MAX_INFRA_FAILURES + 1)


def test_a_late_failure_of_an_older_attempt_changes_nothing(service: StudyService) -> None:
    sid = create(service, "late", budget={"max_trials": 1}, max_retries=2)
    t = service.ask(sid, dispatched=True)
    service.fail_attempt(t.id, "lost", failure_class=FailureClass.INFRASTRUCTURE)
    service.ask(sid, dispatched=True)
    stale = service.fail_attempt(t.id, "late", failure_class=FailureClass.TRAINABLE, attempt=1)
    assert (stale.state, stale.attempts) == ("running", 2)


def test_a_trial_that_only_heartbeats_fails_for_no_progress_and_is_cancelled(
    service: StudyService, executor: FakeExecutor, tmp_path: Path
) -> None:
    # 1 s of slack between a step and the check that it kept the trial alive: on a busy
    # machine (two test workers on two cores) a report plus a check can take a few tenths
    create(service, "stalled", budget={"max_trials": 1}, progress_timeout_s=1.5)
    scheduler = scheduler_of(service, executor, tmp_path)
    scheduler.tick()
    (ref,) = executor.launched
    executor.place(ref)
    for step in (1, 2):  # progress: each new step moves the deadline
        service.report(ref.trial_id, [MetricInput(step=step, name="loss", value=1.0 / step)])
        time.sleep(0.5)
        assert service.expire_leases() == 0
    deadline = row(service, ref.trial_id).progress_expires_at
    for _ in range(4):  # heartbeats alone do not
        service.heartbeat(ref.trial_id)
        time.sleep(0.5)
    assert service.expire_leases() == 1
    trial = service.storage.get_trial(ref.trial_id)
    assert trial.state == "failed" and trial.error.startswith("no progress")
    assert deadline is not None
    scheduler.tick()
    assert executor.cancelled == [ref] and scheduler.in_flight == {}


def test_an_attempt_past_trial_timeout_fails_without_retry(
    service: StudyService, executor: FakeExecutor, tmp_path: Path
) -> None:
    create(
        service,
        "overlong",
        budget={"max_trials": 1, "trial_timeout_s": 0.5},
        max_retries=3,
    )
    scheduler = scheduler_of(service, executor, tmp_path)
    scheduler.tick()
    (ref,) = executor.launched
    executor.place(ref)
    service.report(ref.trial_id, [MetricInput(step=1, name="loss", value=1.0)])
    time.sleep(0.6)
    assert service.expire_leases() == 1
    trial = service.storage.get_trial(ref.trial_id)
    assert (trial.state, trial.attempts) == ("failed", 1)
    assert "trial_timeout_s" in trial.error
    scheduler.tick()
    assert executor.cancelled == [ref] and executor.launched == [ref]


def test_the_study_timeout_ends_running_trials_and_the_study(
    service: StudyService, executor: FakeExecutor, tmp_path: Path
) -> None:
    # 2 s: the first tick must launch before the time runs out, also on a busy machine
    sid = create(service, "out-of-time", budget={"max_trials": 8, "timeout_s": 2.0})
    idle = create(service, "nothing-launches", budget={"max_trials": 8, "timeout_s": 2.0})
    service.update_study(idle, state="paused")
    scheduler = scheduler_of(service, executor, tmp_path)
    scheduler.tick()
    running = [
        r for r in executor.launched if service.storage.get_trial(r.trial_id).study_id == sid
    ]
    assert running
    for ref in running:
        executor.place(ref)
    time.sleep(2.1)
    service.expire_leases()
    study = service.storage.get_study(sid)
    assert study.state == "completed" and "timeout_s" in study.state_reason
    assert study.counts["running"] == 0 and study.counts["failed"] == len(running)
    assert service.storage.get_study(idle).state == "completed"
    scheduler.tick()
    assert sorted(executor.cancelled) == sorted(running) and executor.cluster.live() == []


def test_a_long_blocking_call_keeps_the_lease(service: StudyService) -> None:
    """A local Ray may take longer than the lease to start: while the scheduler thread is
    blocked in it, the lease is renewed, and a standby cannot take over."""
    from hpo.service.leadership import SchedulerLease

    leader = SchedulerLease(service.storage, lease_s=0.6, holder="leader")
    standby = SchedulerLease(service.storage, lease_s=0.6, holder="standby")
    assert leader.hold() == (True, False)
    with leader.kept():
        time.sleep(2.0)  # more than three leases long
        assert standby.hold()[0] is False
    assert leader.held and leader.hold() == (True, False)
    time.sleep(0.8)  # not renewed any more: the standby may take it
    assert standby.hold()[0] is True
