"""Promotion ASHA on a real database: trials pause at rungs, the top 1/η of a rung are resumed
(same number, a new attempt, no retry spent) before any new trial starts, every pause and
promotion is in the trial's history, and concurrent askers never promote past floor(n/η)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from hpo.service import reporting
from hpo.service.db import make_engine
from hpo.service.db.models import Trial
from hpo.service.errors import BudgetSpent, ConcurrencyLimit
from hpo.service.executor import AttemptRef
from hpo.service.records import ClaimedTrial, MetricInput
from hpo.service.scheduler import Scheduler
from hpo.service.spec import StudySpec
from hpo.service.storage import Storage
from hpo.service.studies import StudyService
from hpo.workers import checkpoints
from tests.conftest import simple_spec
from tests.service.fake_executor import FakeCluster, FakeExecutor

PROMOTION = {"type": "asha", "mode": "promotion", "min_steps": 1, "reduction_factor": 2}


def create(service: StudyService, name: str, **over: object) -> int:
    spec = simple_spec(
        name,
        budget={"max_trials": 4},
        pruner={**PROMOTION, "max_steps": 4},
        resources={"workers_per_trial": 1, "cpus_per_worker": 1},
        trainable={"name": "synthetic", "config": {"steps": 4}},
    )
    spec.update(over)
    return service.create_study(StudySpec.model_validate(spec)).id


def report(service: StudyService, trial_id: int, step: int, loss: float) -> bool:
    return service.report(trial_id, [MetricInput(step, "loss", loss)])


def save(
    service: StudyService, executor: FakeExecutor, ref: AttemptRef, tmp_path: Path, step: int
) -> str:
    """A real checkpoint where the scheduler puts the attempt's (see ``_trial_dir``)."""
    study_id = service.storage.get_trial(ref.trial_id, events=False).study_id
    folder = tmp_path / f"study-{study_id}" / f"trial-{ref.trial_id}" / f"attempt-{ref.attempt}"
    path = checkpoints.write(folder, step, {"w": torch.zeros(2)}, {"step": step})
    executor.checkpoint(ref, str(path), step)
    return str(path)


def states(service: StudyService, study_id: int) -> dict[int, str]:
    return {t.number: str(t.state) for t in service.storage.list_trials(study_id)[0]}


def test_trials_pause_at_rungs_and_the_best_are_promoted_before_new_trials(
    service: StudyService, tmp_path: Path
) -> None:
    executor = FakeExecutor(FakeCluster(capacity={"CPU": 4.0}))
    scheduler = Scheduler(
        service, executor, api_url="http://127.0.0.1:1", token=None, checkpoint_dir=tmp_path
    )
    study_id = create(service, "promoted")
    scheduler.tick()
    first = sorted(executor.launched)
    assert len(first) == 4
    losses = {ref.trial_id: loss for ref, loss in zip(first, [0.4, 0.3, 0.2, 0.1], strict=True)}
    for ref in first:
        executor.place(ref)
        assert report(service, ref.trial_id, 1, losses[ref.trial_id]) is True  # pause
    # every one paused at rung 0: none is promoted while its attempt has not ended
    assert set(states(service, study_id).values()) == {"paused"}
    study = service.storage.get_study(study_id)
    assert study.counts["paused"] == 4 and study.state == "running"
    for ref in first:
        save(service, executor, ref, tmp_path, 1)
        executor.finish(ref)
    scheduler.tick()  # attempts end (released), then the top floor(4/2) = 2 are promoted
    promoted = sorted(executor.launched[4:])
    assert {r.trial_id for r in promoted} == {first[2].trial_id, first[3].trial_id}
    assert all(r.attempt == 2 for r in promoted)  # same trial, next attempt, no new trial
    assert service.storage.get_study(study_id).n_trials == 4
    best = service.storage.get_trial(first[3].trial_id)
    assert best.state == "running" and best.attempts == 2 and best.error is None
    history = [(e.state, e.detail) for e in best.events]
    paused = next(d for s, d in history if s == "paused")
    assert "rank 1 of 4" in paused and "promotable: top 2" in paused
    promotion = next(d for s, d in history if s == "waiting")
    assert "promoted" in promotion and "rank 1 of 4" in promotion and "threshold 0.2" in promotion
    # the two promoted pause at rung 1 (step 2); only the better one goes on
    for ref, loss in zip(promoted, [0.15, 0.05], strict=True):
        executor.place(ref)
        assert report(service, ref.trial_id, 2, loss) is True
        save(service, executor, ref, tmp_path, 2)
        executor.finish(ref)
    scheduler.tick()
    (last,) = executor.launched[6:]
    assert last == AttemptRef(first[3].trial_id, 3)
    executor.place(last)
    assert report(service, last.trial_id, 4, 0.01) is False  # the top rung: no pause
    executor.finish(last, loss=0.01)
    scheduler.tick()
    study = service.storage.get_study(study_id)
    assert study.state == "completed"
    assert study.counts == {
        "waiting": 0,
        "running": 0,
        "paused": 0,
        "complete": 1,
        "pruned": 3,
        "failed": 0,
    }
    pruned = service.storage.get_trial(first[0].trial_id)
    assert pruned.events[-1].state == "pruned" and "without promoting" in pruned.events[-1].detail


def test_a_paused_trial_whose_checkpoint_is_gone_fails_with_that_reason(
    service: StudyService, tmp_path: Path
) -> None:
    executor = FakeExecutor(FakeCluster(capacity={"CPU": 2.0}))
    scheduler = Scheduler(
        service, executor, api_url="http://127.0.0.1:1", token=None, checkpoint_dir=tmp_path
    )
    study_id = create(service, "lost", budget={"max_trials": 2})
    scheduler.tick()
    refs = sorted(executor.launched)
    paths = []
    for ref, loss in zip(refs, [0.5, 0.1], strict=True):
        executor.place(ref)
        report(service, ref.trial_id, 1, loss)
        paths.append(save(service, executor, ref, tmp_path, 1))
        executor.finish(ref)
    (Path(paths[1]) / "state.pt").write_bytes(b"not a torch archive")
    scheduler.tick()
    broken = service.storage.get_trial(refs[1].trial_id)
    assert broken.state == "failed" and "unreadable" in broken.error
    assert broken.events[-1].detail.startswith("cannot resume: its checkpoint")
    assert len(executor.launched) == 2  # nothing was launched for it
    assert states(service, study_id) == {0: "pruned", 1: "failed"}


def asks_at_once(
    db_url: str, n: int, study_id: int, *, dispatched: bool = False
) -> tuple[list[ClaimedTrial], list[Exception]]:
    """``n`` servers of their own (a service each, with its own engine on ``db_url``; one
    server's asks of a study take turns) ask the study at the same moment: what they
    claimed, and the budget errors (BudgetSpent, ConcurrencyLimit) the others got."""
    claimed: list[ClaimedTrial] = []
    refused: list[Exception] = []
    barrier = threading.Barrier(n)
    engines = [make_engine(db_url) for _ in range(n)]

    def ask(server: StudyService) -> None:
        barrier.wait()
        try:
            claimed.append(server.ask(study_id, dispatched=dispatched))
        except (BudgetSpent, ConcurrencyLimit) as exc:
            refused.append(exc)

    threads = [
        threading.Thread(target=ask, args=(StudyService(Storage(engine)),)) for engine in engines
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for engine in engines:
        engine.dispose()
    return claimed, refused


@pytest.mark.parametrize("askers", [8])
def test_concurrent_askers_promote_at_most_floor_n_over_eta(
    service: StudyService, db_url: str, askers: int
) -> None:
    """Askers on servers of their own (a server's asks of one study take turns) race to
    promote paused trials: at most floor(n/eta) are promoted, each once."""
    spec = simple_spec("race", budget={"max_trials": 8}, pruner={**PROMOTION, "max_steps": 8})
    study_id = service.create_study(StudySpec.model_validate(spec)).id
    trials = [service.ask(study_id) for _ in range(8)]
    for i, trial in enumerate(trials):
        assert report(service, trial.id, 1, float(i)) is True
    claimed, refused = asks_at_once(db_url, askers, study_id)
    promoted = [t.id for t in claimed]
    # floor(8/2) = 4 promoted, each once, the four best; the other askers are refused
    assert sorted(promoted) == sorted(t.id for t in trials[:4])
    assert len(refused) == askers - 4
    assert service.storage.get_study(study_id).n_trials == 8


def test_max_steps_is_exact_under_concurrent_reports(service: StudyService) -> None:
    spec = simple_spec("steps", budget={"max_trials": 6, "max_steps": 23})
    study_id = service.create_study(StudySpec.model_validate(spec)).id
    trials = [service.ask(study_id) for _ in range(6)]
    barrier = threading.Barrier(len(trials))
    stopped_at: dict[int, int] = {}

    def train(trial_id: int) -> None:
        barrier.wait()
        for step in range(1, 11):
            if report(service, trial_id, step, 1.0 / step):
                stopped_at[trial_id] = step
                return
        service.tell(trial_id, value=0.1)  # ran all its steps before the budget was spent

    threads = [threading.Thread(target=train, args=(t.id,)) for t in trials]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stored = [len(service.storage.metrics(t.id, name="loss")) for t in trials]
    assert sum(stored) == 23  # 6 x 10 steps wanted; exactly the budget was stored
    records = [service.storage.get_trial(t.id) for t in trials]
    assert sum(r.last_step or 0 for r in records) == 23
    assert {r.state for r in records} <= {"pruned", "complete"} and stopped_at
    assert any("budget.max_steps (23) spent" in r.events[-1].detail for r in records)
    study = service.storage.get_study(study_id)
    assert study.state == "completed" and study.state_reason == "budget.max_steps spent"


@pytest.mark.parametrize("per_commit", [1_000, 2])
@pytest.mark.parametrize("seconds", [None, 3600.0])
def test_steps_reported_every_n_stop_at_max_steps_between_two_of_them(
    service: StudyService, monkeypatch: pytest.MonkeyPatch, per_commit: int, seconds: float | None
) -> None:
    """Steps reported every 100 against ``max_steps: 250``: the points up to 200 are kept and
    the trial is pruned, naming ``budget.max_steps`` (a cut short of the budget's last step
    was blamed on ``max_worker_seconds``: a TypeError when that budget was unset, the trial
    never told to stop), whether the batch takes one commit or two."""
    monkeypatch.setattr(reporting, "POINTS_PER_COMMIT", per_commit)
    budget = {"max_trials": 3, "max_steps": 250, "max_worker_seconds": seconds}
    study_id = service.create_study(
        StudySpec.model_validate(simple_spec("every-100", budget=budget))
    ).id
    trial = service.ask(study_id)
    points = [MetricInput(step, "loss", 1.0 / step) for step in (100, 200, 300)]
    assert service.report(trial.id, points) is True
    record = service.storage.get_trial(trial.id)
    assert record.state == "pruned" and record.last_step == 200
    assert "budget.max_steps (250) spent: stopped at step 200" in record.events[-1].detail
    assert [p.step for p in service.storage.metrics(trial.id)] == [100, 200]
    assert service.report(trial.id, points) is True  # sent again: still told to stop
    assert [p.step for p in service.storage.metrics(trial.id)] == [100, 200]


def test_max_worker_seconds_stops_trials_and_new_asks_once_used(service: StudyService) -> None:
    spec = simple_spec("compute", budget={"max_trials": 6, "max_worker_seconds": 0.6})
    study_id = service.create_study(StudySpec.model_validate(spec)).id
    a, b = service.ask(study_id), service.ask(study_id)
    assert report(service, a.id, 1, 0.5) is False  # ~0 s used so far
    time.sleep(0.4)  # two running attempts: 0.8 worker-seconds
    with pytest.raises(BudgetSpent) as refused:
        service.ask(study_id)
    assert refused.value.field == "budget.max_worker_seconds"
    assert report(service, a.id, 2, 0.4) is True  # pruned at its last stored step
    assert report(service, b.id, 1, 0.3) is True
    trial = service.storage.get_trial(a.id)
    assert trial.state == "pruned" and trial.last_step == 1
    assert "budget.max_worker_seconds (0.6) spent" in trial.events[-1].detail
    assert [p.step for p in service.storage.metrics(a.id)] == [1]
    study = service.storage.get_study(study_id)
    assert study.state == "completed" and study.state_reason == "budget.max_worker_seconds spent"


def test_a_new_scheduler_releases_what_a_dead_one_paused(
    service: StudyService, tmp_path: Path
) -> None:
    cluster = FakeCluster(capacity={"CPU": 2.0})
    executor = FakeExecutor(cluster)
    old = Scheduler(
        service, executor, api_url="http://127.0.0.1:1", token=None, checkpoint_dir=tmp_path
    )
    create(service, "takeover", budget={"max_trials": 2})
    old.tick()
    refs = sorted(executor.launched)
    for ref, loss in zip(refs, [0.5, 0.1], strict=True):
        executor.place(ref)
        report(service, ref.trial_id, 1, loss)
        save(service, executor, ref, tmp_path, 1)
    old.release()  # the old control plane dies before it saw the attempts end...
    for ref in refs:
        executor.lose(ref)  # ...and its local cluster with it
    fresh = FakeExecutor(cluster)
    new = Scheduler(
        service, fresh, api_url="http://127.0.0.1:1", token=None, checkpoint_dir=tmp_path
    )
    new.tick()  # adopts: the paused trials are released, the best one promoted
    (resumed,) = fresh.launched
    assert resumed == AttemptRef(refs[1].trial_id, 2)
    assert service.storage.get_trial(refs[0].trial_id).state == "paused"


def test_hyperband_brackets_pause_and_promote_within_their_own_bracket(
    service: StudyService,
) -> None:
    hyperband = {**PROMOTION, "type": "hyperband", "max_steps": 3}  # brackets 0 and 1
    spec = simple_spec("hb", budget={"max_trials": 4}, pruner=hyperband)
    study_id = service.create_study(StudySpec.model_validate(spec)).id
    trials = [service.ask(study_id) for _ in range(4)]  # numbers 0, 2: bracket 0; 1, 3: 1
    losses = {0: 0.5, 1: 0.9, 2: 0.4, 3: 0.1}
    paused = [report(service, t.id, 1, losses[t.number]) for t in trials]
    assert paused == [True, False, True, False]  # bracket 0's first rung is step 1
    assert report(service, trials[0].id, 2, 0.01) is True  # paused: its late point is dropped
    for t in trials[1::2]:  # bracket 1's first rung is step 2
        assert report(service, t.id, 2, losses[t.number]) is True
    pause = service.storage.get_trial(trials[3].id).events[-1]
    assert pause.state == "paused" and "rung 0 (step 2), rank 1 of 2" in pause.detail
    # each bracket promotes its own top floor(2/2) = 1: #3 (bracket 1) and #2 (bracket 0)
    assert [service.ask(study_id).number for _ in range(2)] == [3, 2]
    with pytest.raises(BudgetSpent):
        service.ask(study_id)


def test_a_late_paused_attempt_resumes_from_the_pause_step_not_past_it(
    service: StudyService, tmp_path: Path
) -> None:
    study_id = create(service, "late", budget={"max_trials": 2})
    a, b = service.ask(study_id, dispatched=True), service.ask(study_id, dispatched=True)
    assert report(service, a.id, 1, 0.5) is True
    assert report(service, b.id, 1, 0.1) is True
    assert report(service, b.id, 2, 0.05) is True  # ran on before the answer: dropped
    folder = tmp_path / f"trial-{b.id}" / "attempt-1"
    saved = [
        checkpoints.write(folder, step, {"w": torch.zeros(1)}, {"step": step}) for step in (1, 2)
    ]
    service.storage.set_checkpoint(b.id, str(saved[1]))  # the newest, as the scheduler saw it
    promoted = service.ask(study_id, dispatched=True)
    assert promoted.id == b.id and promoted.attempts == 2
    assert promoted.resume_from == str(saved[0])  # the pause step: the curve has no gap
    assert [p.step for p in service.storage.metrics(b.id)] == [1]


@pytest.mark.parametrize("recorded", ["now", "before stored_to was"])
def test_a_late_paused_attempt_on_two_step_axes_resumes_from_the_pause_step(
    service: StudyService, tmp_path: Path, recorded: str
) -> None:
    """A trainable that streams a loss per optimizer step beside the ranked metric per epoch
    (text-classification does): the trial's last step is the optimizer's, but it is ranked
    at, and resumes from the checkpoint of, the epoch it paused at, not the late one. Also
    for a trial paused by an older version, whose pause reason has no ``stored_to``."""
    study_id = create(service, "late-two-axes", budget={"max_trials": 2})
    a, b = service.ask(study_id, dispatched=True), service.ask(study_id, dispatched=True)
    for trial, loss in ((a, 0.5), (b, 0.1)):  # paused at epoch 1, optimizer step 30
        both = [MetricInput(30, "train_loss", 0.2), MetricInput(1, "loss", loss)]
        assert service.report(trial.id, both) is True
    if recorded != "now":
        with service.storage.write() as s:
            for trial in (a, b):
                row = s.get(Trial, trial.id)
                row.pause_reason = {k: v for k, v in row.pause_reason.items() if k != "stored_to"}
    assert report(service, b.id, 2, 0.05) is True  # ran on before the answer: dropped
    folder = tmp_path / f"trial-{b.id}" / "attempt-1"
    saved = [
        checkpoints.write(folder, step, {"w": torch.zeros(1)}, {"step": step}) for step in (1, 2)
    ]
    service.storage.set_checkpoint(b.id, str(saved[1]))
    assert service.storage.get_trial(b.id).last_step == 30
    promoted = service.ask(study_id, dispatched=True)
    assert promoted.id == b.id and promoted.resume_from == str(saved[0])
    service.tell(b.id, value=0.01)  # the study ends: #0, still paused, is pruned
    (ended,) = [e for e in service.storage.get_trial(a.id).events if e.state == "pruned"]
    assert ended.detail.startswith("paused at step 1;")


def test_a_promotion_spends_no_retry(service: StudyService) -> None:
    """A resumed attempt is no retry: with ``max_retries: 1`` a promoted trial whose attempt
    fails is retried once, as a trial that was never paused is, and fails the second time."""
    spec = simple_spec("resume-no-retry", max_retries=1, pruner={**PROMOTION, "max_steps": 4})
    study_id = service.create_study(StudySpec.model_validate(spec)).id
    good, bad = service.ask(study_id), service.ask(study_id)
    assert report(service, good.id, 1, 0.1) is True and report(service, bad.id, 1, 0.9) is True
    promoted = service.ask(study_id)  # the top floor(2/2) = 1 of rung 0
    assert (promoted.id, promoted.attempts) == (good.id, 2)
    assert service.fail_attempt(good.id, "boom").state == "waiting"
    retried = service.ask(study_id)
    assert (retried.id, retried.attempts) == (good.id, 3)
    failed = service.fail_attempt(good.id, "boom again")
    assert failed.state == "failed" and failed.error == "boom again"


def test_a_resumed_attempt_cannot_rewrite_the_rung_it_was_promoted_on(
    service: StudyService,
) -> None:
    """An ask/tell client that trains a promoted trial again from its start reports the rung's
    step again: that point is not stored (the rung keeps the value the trial was ranked on),
    so the others' ranks do not move and no second trial of the rung is promoted past
    floor(n/η). Steps after the pause are stored as usual."""
    spec = simple_spec("rung-kept", pruner={**PROMOTION, "max_steps": 8})
    study_id = service.create_study(StudySpec.model_validate(spec)).id
    asked = [service.ask(study_id) for _ in range(3)]
    for t, loss in zip(asked, [0.1, 0.5, 0.9], strict=True):
        assert report(service, t.id, 1, loss) is True  # all pause at rung 0 (step 1)
    promoted = service.ask(study_id)  # the top floor(3/2) = 1
    assert (promoted.id, promoted.attempts) == (asked[0].id, 2)
    again = [MetricInput(1, "loss", 99.0)]
    assert service.report(promoted.id, again, attempt=2) is False
    points = service.storage.metrics(promoted.id)
    assert [(p.step, p.value, p.attempt) for p in points] == [(1, 0.1, 1)]
    fresh = service.ask(study_id)  # nothing else is promotable: a new trial
    assert fresh.number == 3 and fresh.attempts == 1
    assert states(service, study_id)[1] == "paused"
    assert (
        service.report(
            promoted.id, [MetricInput(1, "loss", 7.0), MetricInput(3, "loss", 0.05)], attempt=2
        )
        is True
    )
    points = service.storage.metrics(promoted.id)
    assert [(p.step, p.value, p.attempt) for p in points] == [(1, 0.1, 1), (3, 0.05, 2)]


def test_an_ask_sent_again_answers_the_trial_it_promoted_or_claimed(
    service: StudyService,
) -> None:
    """An ask with an Idempotency-Key that promoted a paused trial, or claimed a waiting
    one, sent again (its answer was lost) answers that trial and attempt again, with a new
    token, and spends nothing; once that attempt ended and the trial was handed out again,
    the key is refused (StaleAttempt)."""
    from hpo.service.errors import StaleAttempt
    from hpo.service.executor import FailureClass

    spec = simple_spec("keyed-claims", max_retries=3, pruner={**PROMOTION, "max_steps": 8})
    study_id = service.create_study(StudySpec.model_validate(spec)).id
    good, bad = service.ask(study_id), service.ask(study_id)
    assert report(service, good.id, 1, 0.1) is True and report(service, bad.id, 1, 0.9) is True
    promoted = service.ask(study_id, key="k-promote")
    again = service.ask(study_id, key="k-promote")
    assert (again.id, again.attempts) == (promoted.id, promoted.attempts) == (good.id, 2)
    assert again.attempt_token != promoted.attempt_token
    service.fail_attempt(good.id, "lost", failure_class=FailureClass.INFRASTRUCTURE)
    claimed = service.ask(study_id, key="k-waiting")  # the waiting trial, attempt 3
    assert (claimed.id, claimed.attempts) == (good.id, 3)
    again = service.ask(study_id, key="k-waiting")
    assert (again.id, again.attempts) == (good.id, 3)
    with pytest.raises(StaleAttempt):
        service.ask(study_id, key="k-promote")  # attempt 2 is over: handed out again
    study = service.storage.get_study(study_id)
    assert study.n_trials == 2 and study.counts["running"] == 1 and study.counts["paused"] == 1


def test_copies_of_one_keyed_ask_that_race_claim_one_trial(service: StudyService) -> None:
    """Copies of one ask (a client's timed-out request and its retry, on two servers) that
    each read "no trial for this key" before the other wrote: under the study's lock the
    later one finds the key taken and looks again, answering the trial the first claimed,
    instead of claiming or creating a second one."""
    from hpo.service import asking
    from hpo.service.executor import FailureClass
    from hpo.service.samplers.base import Suggestion

    spec = simple_spec("key-race", max_retries=3)
    study_id = service.create_study(StudySpec.model_validate(spec)).id
    first, second = service.ask(study_id), service.ask(study_id)
    for t in (first, second):
        service.fail_attempt(t.id, "lost", failure_class=FailureClass.INFRASTRUCTURE)
    storage, parsed = service.storage, service.storage.spec_of(study_id)
    won = asking._claim_waiting(storage, study_id, second.id, parsed, False, "K")
    assert won is not None and won.id == second.id
    assert asking._claim_waiting(storage, study_id, first.id, parsed, False, "K") is None
    new = Suggestion({"x": 0.0}, {"sampler": "random"})
    assert asking._claim_new(storage, study_id, 2, parsed, new, False, "K") is None
    again = service.ask(study_id, key="K")
    assert (again.id, again.attempts) == (second.id, 2)
    study = service.storage.get_study(study_id)
    assert study.n_trials == 2 and study.counts["running"] == 1 and study.counts["waiting"] == 1


def test_a_resumed_attempt_training_again_makes_progress(service: StudyService) -> None:
    """A promoted trial's client that trains it again from its start reports steps that are
    not stored (they were, before the pause): its progress deadline moves all the same, as
    a new point's would, so ``progress_timeout_s`` does not fail it while it catches up."""
    from datetime import timedelta

    from sqlalchemy import update

    from hpo.service.db.models import MetricPoint, Trial, utcnow
    from hpo.service.storage import deadlines

    spec = simple_spec(
        "resume-progress", progress_timeout_s=60, pruner={**PROMOTION, "max_steps": 8}
    )
    study_id = service.create_study(StudySpec.model_validate(spec)).id
    good, bad = service.ask(study_id), service.ask(study_id)
    assert report(service, good.id, 2, 0.1) is True and report(service, bad.id, 2, 0.9) is True
    promoted = service.ask(study_id)
    assert (promoted.id, promoted.attempts) == (good.id, 2)
    ago = timedelta(seconds=55)  # the attempt began 55 s ago, its trial's points older still
    with service.storage.write() as s:
        s.execute(update(Trial).where(Trial.id == good.id).values(started_at=utcnow() - ago))
        s.execute(
            update(MetricPoint)
            .where(MetricPoint.trial_id == good.id)
            .values(time=utcnow() - 2 * ago)
        )
    assert service.report(good.id, [MetricInput(1, "loss", 0.5)], attempt=2) is False
    with service.storage.write() as s:
        late = deadlines.overdue(s, deadlines.timed_studies(s), utcnow() + timedelta(seconds=30))
    assert [o.trial_id for o in late] == []
    with service.storage.write() as s:
        late = deadlines.overdue(s, deadlines.timed_studies(s), utcnow() + timedelta(seconds=61))
    assert [(o.trial_id, o.deadline) for o in late] == [(good.id, "progress")]


def test_a_resumed_attempt_stores_its_later_steps_of_every_metric(service: StudyService) -> None:
    """Only the ranked metric's steps up to the pause are kept from a resumed attempt; its
    other metrics are stored as any attempt's (a trainable may report them on another axis:
    text-classification's training loss by optimizer step, its validation by epoch)."""
    spec = simple_spec("other-metrics", pruner={**PROMOTION, "max_steps": 8})
    study_id = service.create_study(StudySpec.model_validate(spec)).id
    good, bad = service.ask(study_id), service.ask(study_id)
    for t, loss in ((good, 0.1), (bad, 0.9)):
        points = [MetricInput(1, "acc", 1 - loss), MetricInput(1, "loss", loss)]
        assert service.report(t.id, points) is True
    promoted = service.ask(study_id)
    assert (promoted.id, promoted.attempts) == (good.id, 2)
    again = [MetricInput(1, "acc", 0.5), MetricInput(1, "loss", 7.0), MetricInput(2, "loss", 0.08)]
    assert service.report(good.id, again, attempt=2) is True  # rung 1 (step 2): it pauses
    stored = {(p.name, p.step): (p.value, p.attempt) for p in service.storage.metrics(good.id)}
    assert stored == {("acc", 1): (0.5, 2), ("loss", 1): (0.1, 1), ("loss", 2): (0.08, 2)}


@pytest.mark.parametrize(
    ("pruner", "max_trials", "top"),
    [
        ({"type": "asha", "max_steps": 27}, 20, 27),
        ({"type": "hyperband", "max_steps": 20}, 6, 20),  # 20/1 is no power of 3
        ({"type": "hyperband", "max_steps": 27}, 3, 27),
    ],
)
def test_a_study_whose_last_rungs_hold_fewer_than_eta_trials_still_completes_one(
    service: StudyService, pruner: dict, max_trials: int, top: int
) -> None:
    """floor(n/η) is 0 at a rung fewer than η trials reached: with 20 trials, η 3 and rungs
    1, 3, 9, 27, none went past step 9, and the study ended with every trial pruned and no
    best (Hyperband too, where max_steps/min_steps is no power of η, or its budget is small).
    Once no trial can reach a rung any more, its best paused trial goes on."""
    spec = simple_spec(
        "few",
        sampler={"type": "random", "seed": 0},
        budget={"max_trials": max_trials},
        pruner={**PROMOTION, "reduction_factor": 3, **pruner},
        space={"x": {"type": "float", "low": -2.0, "high": 3.0}},
    )
    sid = service.create_study(StudySpec.model_validate(spec)).id
    reached: dict[int, int] = {}
    while True:
        try:
            t = service.ask(sid)
        except BudgetSpent:
            break
        x = t.params["x"]
        for step in range(reached.get(t.id, 0) + 1, top + 1):
            reached[t.id] = step
            if service.report(t.id, [MetricInput(step, "loss", (x - 1) ** 2 + 1 / step)]):
                break
        else:
            service.tell(t.id, value=(x - 1) ** 2 + 1 / top)
    record = service.storage.get_study(sid)
    assert record.state == "completed" and record.counts["paused"] == 0
    assert record.counts["complete"] >= 1 and max(reached.values()) == top
    assert record.best_trial is not None
    assert len(reached) == max_trials  # no trial beyond the budget
