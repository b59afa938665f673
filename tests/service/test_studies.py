"""The core workflows on a real database: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import math
import threading
import time

import optuna
import pytest
from sqlalchemy import event, select

from hpo.service import transitions
from hpo.service.db import make_engine, upgrade_schema
from hpo.service.db.models import MetricPoint, Trial
from hpo.service.errors import (
    AskContention,
    BudgetSpent,
    ConcurrencyLimit,
    Conflict,
    GridExhausted,
    InvalidInput,
    NameTaken,
    StudyNotFound,
    StudyNotRunning,
    SuggestionPending,
    TrialFinished,
    TrialNotFound,
)
from hpo.service.executor import FailureClass
from hpo.service.histories import Histories
from hpo.service.samplers import _optuna
from hpo.service.samplers.base import StudyView
from hpo.service.spec import StudySpec
from hpo.service.states import IllegalTransition
from hpo.service.storage import Storage, trials
from hpo.service.storage import studies as studies_rows
from hpo.service.studies import LEASE_SWEEP_EVERY_S, MetricInput, StudyService
from tests.conftest import simple_spec


def create(service: StudyService, **over: object) -> int:
    return service.create_study(StudySpec.model_validate(simple_spec(**over))).id


def test_ask_tell_roundtrip_and_best(service: StudyService) -> None:
    sid = create(service, budget={"max_trials": 5})
    for _ in range(5):
        t = service.ask(sid)
        service.tell(t.id, value=(t.params["x"] - 1) ** 2)
    with pytest.raises(BudgetSpent, match="all 5 trials"):
        service.ask(sid)
    study = service.storage.get_study(sid)
    assert study.state == "completed" and study.counts["complete"] == 5
    trials, _ = service.storage.list_trials(sid)
    assert study.best_trial.value == min(t.value for t in trials)
    assert [t.number for t in sorted(trials, key=lambda t: t.number)] == [0, 1, 2, 3, 4]


def test_names_are_unique(service: StudyService) -> None:
    create(service)
    with pytest.raises(NameTaken):
        create(service)


def test_tell_is_idempotent_and_conflicts_are_refused(service: StudyService) -> None:
    sid = create(service)
    t = service.ask(sid)
    first = service.tell(t.id, value=0.5)
    again = service.tell(t.id, value=0.5)
    assert again.seq == first.seq  # nothing changed
    with pytest.raises(TrialFinished, match="already finished as complete with value 0.5"):
        service.tell(t.id, value=0.7)
    with pytest.raises(TrialFinished):
        service.tell(t.id, state="failed")
    assert service.storage.get_trial(t.id).value == 0.5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"value": float("nan")}, "value"),
        ({"value": float("inf")}, "value"),
        ({"values": [1.0, 2.0]}, "values"),
        ({}, "value"),
        ({"state": "failed", "value": 1.0}, "value"),
        ({"state": "exploded"}, "state"),
    ],
)
def test_bad_tells_leave_the_trial_untouched(
    service: StudyService, kwargs: dict, field: str
) -> None:
    sid = create(service)
    t = service.ask(sid)
    with pytest.raises(InvalidInput) as info:
        service.tell(t.id, **kwargs)
    assert info.value.field == field
    assert service.storage.get_trial(t.id).state == "running"


def test_unknown_ids(service: StudyService) -> None:
    with pytest.raises(StudyNotFound):
        service.ask(12345)
    with pytest.raises(TrialNotFound):
        service.tell(999, value=1.0)
    with pytest.raises(TrialNotFound):
        service.report(999, [])


def test_metrics_stream_and_since_cursor(service: StudyService) -> None:
    sid = create(service)
    t = service.ask(sid)
    _, cursor = service.storage.list_trials(sid)
    assert service.storage.list_trials(sid, since=cursor)[0] == []
    for step in range(3):
        assert service.report(t.id, [MetricInput(step, "loss", 1.0 / (step + 1))]) is False
    changed, cursor2 = service.storage.list_trials(sid, since=cursor)
    assert [c.id for c in changed] == [t.id] and changed[0].last_step == 2
    assert cursor2 > cursor
    points = service.storage.metrics(t.id, name="loss", since_step=0)
    assert [(p.step, p.value) for p in points] == [(1, 0.5), (2, 1 / 3)]
    with pytest.raises(InvalidInput, match=r"points\[0\].value"):
        service.report(t.id, [MetricInput(3, "loss", float("nan"))])
    assert len(service.storage.metrics(t.id)) == 3


def test_asha_prunes_through_reports(service: StudyService) -> None:
    sid = create(service, pruner={"type": "asha", "min_steps": 1, "reduction_factor": 2})
    good = service.ask(sid)
    assert service.report(good.id, [MetricInput(1, "loss", 0.1)]) is False
    bad = service.ask(sid)
    # another metric at the same step first (a training loss) must not skip the rung
    assert service.report(bad.id, [MetricInput(1, "train_loss", 0.5)]) is False
    assert service.report(bad.id, [MetricInput(1, "loss", 0.9)]) is True
    pruned = service.storage.get_trial(bad.id)
    assert pruned.state == "pruned" and pruned.value == 0.9
    assert pruned.pruned["threshold"] == 0.1 and pruned.pruned["step"] == 1
    assert "asha" in pruned.events[-1].detail
    # the client telling "pruned" afterwards is the same outcome
    assert service.tell(bad.id, state="pruned").state == "pruned"
    assert service.report(bad.id, [MetricInput(2, "loss", 0.8)]) is True


def test_a_study_completed_by_its_time_runs_again_once_its_time_is_raised(
    service: StudyService,
) -> None:
    sid = create(service, budget={"max_trials": 50, "timeout_s": 0.5})
    service.tell(service.ask(sid).id, value=1.0)
    time.sleep(0.7)
    service.expire_leases()
    assert service.storage.get_study(sid).state == "completed"
    # more trials alone would leave it completed: refused, naming the field, nothing changed
    passed = r"budget\.timeout_s \(0\.5 s\) has passed, \d+ s since it started"
    with pytest.raises(Conflict, match=passed) as refused:
        service.update_study(sid, max_trials=60)
    assert refused.value.field == "budget.timeout_s"
    study = service.storage.get_study(sid)
    assert study.state == "completed" and study.spec["budget"]["max_trials"] == 50
    # nor is a trial queued into it that would never run
    with pytest.raises(Conflict, match="has passed"):
        service.enqueue_trial(sid, {"x": 0.5, "n": 2})
    assert [t.number for t in service.storage.list_trials(sid)[0]] == [0]
    again = service.update_study(sid, timeout_s=3600.0)
    assert again.state == "running" and again.spec["budget"]["timeout_s"] == 3600.0
    assert service.ask(sid).number == 1


def test_a_grid_study_whose_points_are_all_handed_out_stays_completed_and_says_why(
    service: StudyService,
) -> None:
    sid = create(
        service,
        sampler={"type": "grid"},
        space={"c": {"type": "categorical", "choices": ["a", "b"]}},
    )
    for _ in range(2):
        service.tell(service.ask(sid).id, value=1.0)
    with pytest.raises(GridExhausted):
        service.ask(sid)
    with pytest.raises(Conflict, match="all 2 points of its grid were handed out") as refused:
        service.update_study(sid, max_trials=10)
    assert refused.value.field == "sampler"
    # a budget field that cannot run it again is still taken
    assert service.update_study(sid, max_concurrent=3).spec["budget"]["max_concurrent"] == 3


def test_a_used_idempotency_key_with_other_fixed_params_is_refused_not_replayed(
    service: StudyService,
) -> None:
    sid = create(service)
    first = service.ask(sid, key="k1", params={"x": 1.0})
    assert first.params["x"] == 1.0
    assert service.ask(sid, key="k1", params={"x": 1.0}).id == first.id  # a replay
    assert service.ask(sid, key="k1").id == first.id  # a replay that repeats no body
    with pytest.raises(Conflict, match="with other values of x than this ask's") as refused:
        service.ask(sid, key="k1", params={"x": -4.0})
    assert refused.value.field == "Idempotency-Key"
    assert [t.id for t in service.storage.list_trials(sid)[0]] == [first.id]  # none created


def test_grid_exhaustion_completes_the_study(service: StudyService) -> None:
    sid = create(
        service,
        sampler={"type": "grid"},
        space={"c": {"type": "categorical", "choices": ["a", "b"]}},
    )
    seen = []
    for _ in range(2):
        t = service.ask(sid)
        seen.append(t.params["c"])
        service.tell(t.id, value=1.0)
    assert seen == ["a", "b"]
    with pytest.raises(GridExhausted):
        service.ask(sid)
    assert service.storage.get_study(sid).state == "completed"


def test_max_concurrent(service: StudyService) -> None:
    sid = create(service, budget={"max_concurrent": 1})
    t = service.ask(sid)
    with pytest.raises(ConcurrencyLimit, match="max_concurrent = 1"):
        service.ask(sid)
    service.tell(t.id, value=1.0)
    service.ask(sid)


def test_lease_expiry_fails_the_trial_and_frees_the_slot(service: StudyService) -> None:
    sid = create(service, lease_s=0.5, budget={"max_concurrent": 1, "max_trials": 2})
    t = service.ask(sid)
    time.sleep(0.7)
    assert service.expire_leases() == 1
    dead = service.storage.get_trial(t.id)
    assert dead.state == "failed" and dead.error == "lease expired"
    t2 = service.ask(sid)  # slot free again; a failed trial still used budget
    assert t2.number == 1
    service.tell(t2.id, value=1.0)
    with pytest.raises(BudgetSpent):
        service.ask(sid)


class Statements:
    """The SQL statements the service's engine runs inside the ``with`` block."""

    def __init__(self, service: StudyService) -> None:
        self.engine = service.storage.engine
        self.seen: list[str] = []

    def _note(self, conn, cursor, statement, *args) -> None:
        self.seen.append(statement)

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._note)

    def count(self, fragment: str) -> int:
        return sum(fragment in statement for statement in self.seen)


def test_asks_in_a_tight_loop_sweep_expired_leases_at_most_every_tenth_of_a_second(
    service: StudyService,
) -> None:
    sid = create(service)
    with Statements(service) as statements:
        t0 = time.monotonic()
        for _ in range(100):
            service.ask(sid)
        elapsed = time.monotonic() - t0
    sweeps = statements.count("lease_expires_at <")
    # Not one per ask: at most one per LEASE_SWEEP_EVERY_S (the first ask's among them).
    assert 1 <= sweeps < 100, sweeps
    assert sweeps <= 1 + elapsed / LEASE_SWEEP_EVERY_S, (sweeps, elapsed)


def test_tells_count_the_study_s_trials_only_once_its_budget_may_be_spent(
    service: StudyService,
) -> None:
    unbounded = create(service, name="unbounded")
    with Statements(service) as statements:
        for _ in range(5):
            service.tell(service.ask(unbounded).id, value=1.0)
    assert statements.count("count(*)") == 0
    bounded = create(service, name="bounded", budget={"max_trials": 3})
    asked = [service.ask(bounded) for _ in range(3)]
    with Statements(service) as statements:
        for trial in asked:
            service.tell(trial.id, value=1.0)
    assert statements.count("count(*)") == 3  # the budget is spent: each tell counts
    assert service.storage.get_study(bounded).state == "completed"


def test_metrics_renew_the_lease(service: StudyService) -> None:
    sid = create(service, lease_s=1.0)
    t = service.ask(sid)
    for step in range(4):
        time.sleep(0.4)
        service.report(t.id, [MetricInput(step, "loss", 1.0)])
        service.expire_leases()
    assert service.storage.get_trial(t.id).state == "running"


def test_retries_reuse_the_trial_number_and_do_not_use_budget(service: StudyService) -> None:
    sid = create(service, max_retries=1, budget={"max_trials": 1})
    t = service.ask(sid)
    service.fail_attempt(t.id, "worker died")
    waiting = service.storage.get_trial(t.id)
    assert waiting.state == "waiting" and waiting.attempts == 2
    again = service.ask(sid)
    assert again.id == t.id and again.number == 0 and again.attempts == 2
    assert again.params == t.params
    service.fail_attempt(t.id, "worker died again")
    final = service.storage.get_trial(t.id)
    assert final.state == "failed" and final.error == "worker died again"
    assert [e.state for e in final.events] == ["running", "failed", "waiting", "running", "failed"]
    assert service.storage.get_study(sid).state == "completed"


def test_pause_resume_stop(service: StudyService) -> None:
    sid = create(service)
    running = service.ask(sid)
    service.update_study(sid, state="paused")
    with pytest.raises(StudyNotRunning, match="paused"):
        service.ask(sid)
    assert service.report(running.id, [MetricInput(0, "loss", 1.0)]) is False  # drains
    service.update_study(sid, state="running")
    service.ask(sid)
    stopped = service.update_study(sid, state="stopped")
    assert stopped.counts["running"] == 0 and stopped.counts["failed"] == 2
    assert service.report(running.id, [MetricInput(1, "loss", 1.0)]) is True
    with pytest.raises(StudyNotRunning):
        service.update_study(sid, state="running")


def test_stopping_finishes_active_trials_like_any_failure(service: StudyService) -> None:
    sid = create(service, max_retries=1)
    running = service.ask(sid)
    retried = service.ask(sid)
    service.fail_attempt(retried.id, "worker died")  # waiting for attempt 2
    service.update_study(sid, state="stopped")
    for trial_id in (running.id, retried.id):
        trial = service.storage.get_trial(trial_id)
        assert trial.state == "failed" and trial.error == "study stopped"
        assert trial.finished_at is not None and trial.lease_expires_at is None
        assert (trial.events[-1].state, trial.events[-1].detail) == ("failed", "study stopped")
    assert service.storage.get_study(sid).finished_at is not None


def test_failing_a_waiting_trial_again_only_counts_without_retry(service: StudyService) -> None:
    sid = create(service, max_retries=3)
    t = service.ask(sid)
    service.fail_attempt(t.id, "worker died")
    again = service.fail_attempt(t.id, "still queued")  # no attempt runs: nothing to end
    assert again.state == "waiting" and again.attempts == 2 and again.error == "worker died"
    final = service.fail_attempt(t.id, "cannot run", failure_class=FailureClass.DETERMINISTIC)
    assert final.state == "failed" and final.error == "cannot run"
    assert service.fail_attempt(t.id, "late").state == "failed"  # a finished trial stays


def test_metric_points_move_the_curves_cursor_and_state_changes_both(
    service: StudyService,
) -> None:
    """A metric report moves only ``curve_seq``: samplers' histories and the study's ETag see
    no change; finishing or pruning a trial moves ``seq`` (study and trial) as before."""
    storage = service.storage
    sid = create(service, pruner={"type": "asha", "min_steps": 1, "reduction_factor": 2})
    good, bad = service.ask(sid), service.ask(sid)
    seq, curves = storage.study_seq(sid), storage.study_curve_seq(sid)
    assert seq == curves
    service.report(good.id, [MetricInput(0, "loss", 0.5), MetricInput(1, "loss", 0.1)])
    service.report(bad.id, [MetricInput(0, "loss", 0.9)])
    assert storage.study_seq(sid) == seq and storage.study_curve_seq(sid) == curves + 2
    trial = storage.get_trial(good.id)
    assert trial.seq < seq + 1 and trial.curve_seq == curves + 1 and trial.last_step == 1
    changed, cursor = storage.list_trials(sid, since=curves)  # new points count here
    assert {t.id for t in changed} == {good.id, bad.id} and cursor == curves + 2
    observed, _ = storage.observed_since(sid, "loss", since=seq)
    assert all(c.seq <= seq for c in observed)  # only the active ones, unchanged

    assert service.report(bad.id, [MetricInput(1, "loss", 0.9)]) is True  # pruned
    pruned = storage.get_trial(bad.id)
    assert pruned.state == "pruned" and storage.study_seq(sid) == pruned.seq > seq
    assert pruned.curve_seq == pruned.seq == storage.study_curve_seq(sid)
    service.tell(good.id, value=0.1)
    done = storage.get_trial(good.id)
    assert storage.study_seq(sid) == done.seq > pruned.seq
    observed, _ = storage.observed_since(sid, "loss", since=seq)
    assert {c.id for c in observed if c.seq > seq} == {good.id, bad.id}


def test_an_illegal_move_raises_and_stores_nothing(service: StudyService) -> None:
    sid = create(service)
    t = service.ask(sid)
    service.tell(t.id, value=1.0)
    seq = service.storage.study_seq(sid)
    late = pytest.raises(IllegalTransition, match="from complete to failed")
    with late, service.storage.write() as s:
        study, trial = trials.lock(s, t.id)
        transitions.fail(s, study, trial, "late failure")
    assert (
        service.storage.get_trial(t.id).state == "complete"
        and service.storage.study_seq(sid) == seq
    )


def test_budget_patch(service: StudyService) -> None:
    sid = create(service, budget={"max_trials": 1})
    service.tell(service.ask(sid).id, value=1.0)
    assert service.storage.get_study(sid).state == "completed"
    # Raising the budget of a completed study runs it again (issue 14: it was a 409).
    assert service.update_study(sid, max_trials=3).state == "running"
    assert service.ask(sid).number == 1
    sid2 = create(service, name="t2", budget={"max_trials": 2})
    service.ask(sid2)
    service.ask(sid2)
    with pytest.raises(InvalidInput, match="below the 2 trials"):
        service.update_study(sid2, max_trials=1)
    assert service.update_study(sid2, max_trials=3, max_concurrent=5).spec["budget"] == {
        "max_trials": 3,
        "max_concurrent": 5,
        "timeout_s": None,
        "trial_timeout_s": None,
        "max_steps": None,
        "max_worker_seconds": None,
    }
    service.ask(sid2)


def test_imports_grow_a_budget_no_further_than_json_counts_exactly(service: StudyService) -> None:
    from hpo.service.spec import MAX_COUNT
    from hpo.service.warmstart import FinishedTrial

    sid = create(service, budget={"max_trials": MAX_COUNT - 1})
    done = [
        FinishedTrial(params={"x": 0.5}, value=1.0),
        FinishedTrial(params={"x": 0.1}, value=2.0),
    ]
    service.import_trials(sid, done)  # would be 2**53 + 1
    assert service.storage.get_study(sid).spec["budget"]["max_trials"] == MAX_COUNT
    assert service.ask(sid).number == 2


def test_timeout_budget(service: StudyService) -> None:
    # Long enough that the first ask and tell land inside it on a loaded machine (with 0.3 s,
    # a slow tell completed the study first and the ask answered "not running").
    sid = create(service, budget={"timeout_s": 2.0})
    service.tell(service.ask(sid).id, value=1.0)
    time.sleep(2.2)
    with pytest.raises(BudgetSpent, match="ran out of time"):
        service.ask(sid)
    assert service.storage.get_study(sid).state == "completed"


def test_multi_objective_pareto_front(service: StudyService) -> None:
    sid = create(
        service, objective=[{"metric": "err"}, {"metric": "speed", "direction": "maximize"}]
    )
    outcomes = [(0.1, 1.0), (0.2, 5.0), (0.3, 4.0), (0.05, 0.5), (0.2, 0.9)]
    ids = []
    for vals in outcomes:
        t = service.ask(sid)
        service.tell(t.id, values=list(vals))
        ids.append(t.id)
    best, front = service.storage.best(sid)
    assert best is None
    assert sorted(t.id for t in front) == sorted([ids[0], ids[1], ids[3]])


def test_delete_removes_everything(service: StudyService, db_url: str) -> None:
    sid = create(service)
    t = service.ask(sid)
    service.report(t.id, [MetricInput(0, "loss", 1.0)])
    assert service.delete_study(sid) == [t.id]
    with pytest.raises(StudyNotFound):
        service.storage.get_study(sid)
    with service.storage.read() as s:
        assert s.scalars(select(Trial)).all() == []
        assert s.scalars(select(MetricPoint)).all() == []


def test_ask_is_refused_for_dispatched_studies(service: StudyService) -> None:
    sid = create(service, trainable={"name": "image-classification", "config": {}})
    with pytest.raises(Exception, match="ask/tell is for studies without a trainable"):
        service.ask(sid)
    assert service.ask(sid, dispatched=True).number == 0


def test_state_survives_a_new_service_on_the_same_database(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade_schema(engine)
    first = StudyService(Storage(engine))
    sid = create(first, sampler={"type": "tpe", "seed": 0})
    t = first.ask(sid)
    first.tell(t.id, value=2.0)
    engine.dispose()
    engine = make_engine(db_url)
    upgrade_schema(engine)
    second = StudyService(Storage(engine))
    assert second.storage.get_study(sid).best_trial.value == 2.0
    assert second.ask(sid).number == 1
    engine.dispose()


def test_a_far_future_step_reported_first_skips_no_rung(service: StudyService) -> None:
    """A trial that reports one good point at a far-future step and then the worst values
    from step 1 on is judged at every rung it reports, as an honest trial is."""
    sid = create(service, pruner={"type": "asha", "min_steps": 1, "reduction_factor": 3})
    for _ in range(6):
        t = service.ask(sid)
        service.report(t.id, [MetricInput(step, "loss", 1.0) for step in range(1, 28)])
        service.tell(t.id, value=1.0)
    cheat = service.ask(sid)
    assert service.report(cheat.id, [MetricInput(10**6, "loss", 0.01)]) is False
    stops = [service.report(cheat.id, [MetricInput(1, "loss", 50.0)])]
    assert stops == [True]
    record = service.storage.get_trial(cheat.id)
    assert record.state == "pruned" and record.pruned["step"] == 1


def test_a_replayed_step_is_not_judged_again(service: StudyService) -> None:
    sid = create(service, pruner={"type": "asha", "min_steps": 1, "reduction_factor": 2})
    for value in (1.0, 2.0):
        service.report(service.ask(sid).id, [MetricInput(1, "loss", value)])
    kept = service.ask(sid)
    assert service.report(kept.id, [MetricInput(1, "loss", 0.9)]) is False  # best of three
    for value in (0.1, 0.2):  # better trials arrive: judged now, 0.9 would be cut
        service.report(service.ask(sid).id, [MetricInput(1, "loss", value)])
    # the same point again (a retry after a lost answer): stored once, and not judged again
    assert service.report(kept.id, [MetricInput(1, "loss", 0.9)]) is False
    assert service.storage.get_trial(kept.id).state == "running"


# ----------------------------------------------- sampler histories kept between asks


def _legacy_suggest(
    sampler: optuna.samplers.BaseSampler, view: StudyView, *, lie: tuple[float, ...] | None = None
) -> tuple[dict, int]:
    """How suggestions were made before histories were kept: every trial converted and
    deep-copied into a fresh in-memory Optuna study on every ask."""
    spec = view.spec
    study = optuna.create_study(sampler=sampler, directions=[o.direction for o in spec.objectives])
    frozen = [_optuna.frozen_trial(spec, t, lie) for t in view.trials]
    frozen = [f for f in frozen if f is not None]
    study.add_trials(frozen)
    trial = study.ask()
    params: dict = {}
    for name in spec.parameter_order():
        if spec.is_active(name, params):
            params[name] = _optuna._suggest_one(trial, name, spec.space[name])
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return params, sum(1 for f in frozen if f.state in done)


def _rebuilt(storage: Storage, sid: int) -> dict:
    """The suggestion for the study's next trial from a full read of its history."""
    with storage.read() as s:
        study = studies_rows.get(s, sid)
        spec = transitions.spec_of(study)
        view = StudyView(spec, trials.observed(s, study, spec.pruned_metric), study.next_number)
        return transitions.sampler_of(study).suggest(view).params


BAYES_SPACE = {
    "x": {"type": "float", "low": -5.0, "high": 5.0},
    "lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
    "n": {"type": "int", "low": 1, "high": 8},
    "opt": {"type": "categorical", "choices": ["sgd", "adam"]},
}


@pytest.mark.parametrize(("kind", "n_trials"), [("tpe", 40), ("gp", 14)])
def test_kept_histories_suggest_exactly_what_a_full_rebuild_does(
    service: StudyService, monkeypatch: pytest.MonkeyPatch, kind: str, n_trials: int
) -> None:
    """Over asks and tells with trials left running, pruned and failed, every suggestion made
    from the kept history equals the one made from a full read, and the one made the way it
    was before histories were kept (a fresh Optuna study per ask)."""
    sid = create(
        service,
        sampler={"type": kind, "seed": 7, "n_startup_trials": 4},
        space=BAYES_SPACE,
        max_retries=0,
    )
    running = []
    for i in range(n_trials):
        expected = _rebuilt(service.storage, sid)
        with monkeypatch.context() as m:
            m.setattr(_optuna, "suggest", _legacy_suggest)
            assert _rebuilt(service.storage, sid) == expected
        t = service.ask(sid)
        assert t.params == expected, f"trial {i}"
        loss = (t.params["x"] - 1) ** 2 + abs(math.log10(t.params["lr"]) + 2)
        if i % 5 == 2:
            running.append(t.id)  # left pending for a while: the constant liar sees it
        elif i % 7 == 3:
            service.report(t.id, [MetricInput(2, "loss", loss + 1)])
            service.tell(t.id, state="pruned")
        elif i % 11 == 5:
            service.tell(t.id, state="failed", error="boom")
        else:
            service.tell(t.id, value=loss)
        if len(running) > 2:
            service.tell(running.pop(0), value=1.0)
    studies_held, trials_held = service.histories.size()
    assert studies_held == 1 and 0 < trials_held < n_trials


def test_histories_are_dropped_with_their_study_and_bounded(storage: Storage) -> None:
    service = StudyService(storage, histories=Histories(max_studies=1))
    spec = {"sampler": {"type": "tpe", "seed": 3, "n_startup_trials": 2}}
    a, b = create(service, name="a", **spec), create(service, name="b", **spec)
    for told in range(4):
        for sid in (a, b):  # each ask evicts the other study's history
            expected = _rebuilt(storage, sid)
            t = service.ask(sid)
            assert t.params == expected
            service.tell(t.id, value=t.params["x"] ** 2)
            assert service.histories.size() == (1, told)  # what it had seen finished
    service.delete_study(b)
    assert service.histories.size() == (0, 0)


def test_a_history_is_rebuilt_when_the_space_it_was_built_for_changes(
    service: StudyService,
) -> None:
    sid = create(service, sampler={"type": "tpe", "seed": 5, "n_startup_trials": 2})
    for _ in range(6):
        t = service.ask(sid)
        service.tell(t.id, value=t.params["x"] ** 2)
    with service.storage.write() as s:  # a stored spec edited in place (no API edits a space)
        study = studies_rows.get(s, sid, lock=True)
        space = {**study.spec["space"], "x": {"type": "float", "low": 0.0, "high": 1.0}}
        study.spec = {**study.spec, "space": space}
        studies_rows.touch(study)
    expected = _rebuilt(service.storage, sid)
    t = service.ask(sid)
    assert t.params == expected and 0.0 <= t.params["x"] <= 1.0


def test_racing_asks_of_a_tpe_study_share_its_history_and_leave_it_whole(
    service: StudyService,
) -> None:
    """Threads asking and telling one TPE study at once: every trial number is handed out
    once, and afterwards the kept history suggests what a full read does."""
    sid = create(
        service, sampler={"type": "tpe", "seed": 1, "n_startup_trials": 3}, space=BAYES_SPACE
    )
    numbers: list[int] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(6):
                t = service.ask(sid)
                numbers.append(t.number)
                service.tell(t.id, value=(t.params["x"] - 1) ** 2)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert sorted(numbers) == list(range(24))
    expected = _rebuilt(service.storage, sid)
    assert service.ask(sid).params == expected


@pytest.mark.parametrize("kind", ["tpe", "gp"])
def test_two_servers_each_with_its_own_history_see_each_others_trials(
    storage: Storage, db_url: str, kind: str
) -> None:
    """Two control planes on one database, each with its own kept histories: every
    suggestion either makes equals a full read, whichever server told the trials (a
    history must read the changes the other server committed since its cursor)."""
    from hpo.service.db import make_engine

    other_engine = make_engine(db_url)
    try:
        a = StudyService(storage)
        b = StudyService(Storage(other_engine))
        sid = create(a, sampler={"type": kind, "seed": 2, "n_startup_trials": 3}, space=BAYES_SPACE)
        left: list[int] = []
        for i in range(16 if kind == "tpe" else 10):
            asker, teller = (a, b) if i % 3 else (b, a)
            expected = _rebuilt(storage, sid)
            t = asker.ask(sid)
            assert t.params == expected, f"trial {i}"
            if i % 4 == 1:
                left.append(t.id)  # told later, through the other server
                continue
            teller.tell(t.id, value=(t.params["x"] - 1) ** 2)
            if len(left) > 1:
                asker.tell(left.pop(0), value=0.5)
    finally:
        other_engine.dispose()


def test_a_servers_concurrent_asks_of_one_study_take_turns(
    service: StudyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 threads ask one study at once through one service: each samples once and claims
    the number it sampled for (no claim in vain, no 'too many concurrent asks'); without
    turns they raced for the next number and most claims failed."""
    from hpo.service import asking

    claims: list[bool] = []
    claim_new = asking._claim_new

    def counted(*args: object, **kwargs: object) -> object:
        claimed = claim_new(*args, **kwargs)
        claims.append(claimed is not None)
        return claimed

    monkeypatch.setattr(asking, "_claim_new", counted)
    sid = service.create_study(StudySpec.model_validate(simple_spec("turns"))).id
    barrier = threading.Barrier(16)
    numbers: list[int] = []

    def ask() -> None:
        barrier.wait()
        numbers.append(service.ask(sid).number)

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(numbers) == list(range(16))
    assert claims == [True] * 16


def test_asks_that_keep_losing_the_next_number_to_other_servers_are_told_to_retry(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two services on one database (two server processes: their asks do not take turns with
    each other) ask one study from 8 threads each, with a single try per ask: an ask whose
    claim of the next number lost to the other server's is AskContention (HTTP 503 with
    ``Retry-After``, retried by clients), never a 409 that reads like a spent study. No
    number is handed out twice or skipped, and a lost ask writes nothing."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from hpo.api import errors
    from hpo.service import asking

    monkeypatch.setattr(asking, "MAX_ASK_ATTEMPTS", 1)
    servers = [StudyService(storage), StudyService(storage)]
    sid = servers[0].create_study(StudySpec.model_validate(simple_spec("contention"))).id
    barrier = threading.Barrier(16)
    numbers: list[int] = []
    lost: list[AskContention] = []

    def ask(server: StudyService) -> None:
        barrier.wait()
        try:
            numbers.append(server.ask(sid).number)
        except AskContention as exc:
            lost.append(exc)

    threads = [threading.Thread(target=ask, args=(servers[i % 2],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert lost, "no ask lost a race: the drill proved nothing"
    assert sorted(numbers) == list(range(len(numbers)))
    assert len(numbers) + len(lost) == 16
    assert storage.get_study(sid).n_trials == len(numbers)

    app = FastAPI()
    errors.install(app)

    @app.get("/lost")
    def _lost() -> None:
        raise lost[0]

    answer = TestClient(app).get("/lost")
    assert (answer.status_code, answer.headers["Retry-After"]) == (503, "1")
    assert answer.json()["error"] == "ask_contention"
    assert "ask again" in answer.json()["message"]


def test_an_ask_held_by_the_studys_other_asks_past_the_wait_is_told_to_ask_again(
    storage: Storage,
) -> None:
    """Asks of one study take turns; one kept waiting past ``ask_wait_s`` (another ask is in
    a slow sampler's fit) is SuggestionPending (HTTP 503, retry), and wrote nothing."""
    service = StudyService(storage, ask_wait_s=0.2)
    sid = service.create_study(StudySpec.model_validate(simple_spec("held"))).id
    turn = service._asking(sid)
    with turn, pytest.raises(SuggestionPending) as held:  # another ask holds the turn
        service.ask(sid)
    assert "ask again" in held.value.message and held.value.retry_after_s == 1
    assert service.storage.get_study(sid).n_trials == 0
    assert service.ask(sid).number == 0


def test_a_study_stored_before_the_newer_spec_checks_stays_readable_and_runs(
    service: StudyService, storage: Storage
) -> None:
    """Budget counts past 2**53, a rung pruner whose max_steps is below its min_steps and a
    condition on a continuous float are refused when a study is created, not when a stored
    spec is read back: a study stored before those checks is still listed, asked, told and
    edited."""
    sid = service.create_study(StudySpec.model_validate(simple_spec("older"))).id
    child = {"type": "int", "low": 1, "high": 3, "when": {"x": [0.5]}}
    with storage.write() as s:
        study = studies_rows.get(s, sid)
        pruner = {"type": "asha", "min_steps": 9, "max_steps": 3}
        space = {**study.spec["space"], "d": child}
        study.spec = {
            **study.spec,
            "budget": {"max_trials": 2**60},
            "pruner": pruner,
            "space": space,
        }
    assert [r.id for r in storage.list_studies()[0]] == [sid]
    assert storage.get_study(sid).spec["budget"]["max_trials"] == 2**60
    trial = service.ask(sid)
    service.tell(trial.id, value=1.0)
    edited = service.update_study(sid, max_concurrent=2)  # an edit of another field passes
    assert edited.spec["budget"]["max_trials"] == 2**60
    loaded, created = service.create_or_load(StudySpec.model_validate(storage.get_study(sid).spec))
    assert (loaded.id, created) == (sid, False)  # loaded as stored, not held to the checks
    assert service.update_study(sid, max_trials=5).spec["budget"]["max_trials"] == 5
    with pytest.raises(InvalidInput, match="budget.max_trials: at most 2\\*\\*53"):
        service.update_study(sid, max_trials=2**60)
    with pytest.raises(InvalidInput) as refused:  # a new study is held to them
        bad = simple_spec("newer", pruner={"type": "asha", "min_steps": 9, "max_steps": 3})
        service.create_study(StudySpec.model_validate(bad))
    assert refused.value.field == "pruner.max_steps"
    with pytest.raises(InvalidInput) as refused:
        bad = simple_spec("newest", space={**simple_spec()["space"], "d": child})
        service.create_study(StudySpec.model_validate(bad))
    assert refused.value.field == "space.d.when.x"
