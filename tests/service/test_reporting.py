"""Metric reports judged before the write lock: two servers on one database, replays, races."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import func, select

from hpo.service import attempts, reporting
from hpo.service.db import make_engine
from hpo.service.db.models import MetricPoint
from hpo.service.errors import StaleAttempt, TrialFinished
from hpo.service.spec import StudySpec
from hpo.service.storage import Storage, metrics
from hpo.service.studies import MetricInput, StudyService
from tests.conftest import simple_spec

MEDIAN = {"type": "median", "n_startup_trials": 1, "min_steps": 1}


@pytest.fixture
def other(service: StudyService, db_url: str) -> Iterator[StudyService]:
    """A second service on the same database, with its own engine (a second server)."""
    engine = make_engine(db_url)
    yield StudyService(Storage(engine))
    engine.dispose()


def create(service: StudyService) -> int:
    spec = simple_spec("r", pruner=MEDIAN)
    return service.create_study(StudySpec.model_validate(spec)).id


def finish(service: StudyService, sid: int, value: float, steps: int = 3) -> None:
    """A trial that reports ``value`` at steps 1..steps and completes."""
    t = service.ask(sid)
    points = [MetricInput(step, "loss", value) for step in range(1, steps + 1)]
    assert service.report(t.id, points) is False
    service.tell(t.id, value=value)


def n_points(service: StudyService, trial_id: int) -> int:
    with service.storage.read() as s:
        return s.scalar(select(func.count()).where(MetricPoint.trial_id == trial_id))


def test_two_servers_prune_from_each_others_completed_trials(
    service: StudyService, other: StudyService
) -> None:
    sid = create(service)
    finish(service, sid, 1.0)
    # Server B judges step 2 while one trial is complete (median 1.0): it continues, and B
    # now holds the complete trials' values at step 2 in memory.
    early = other.ask(sid)
    assert other.report(early.id, [MetricInput(2, "loss", 0.5)]) is False
    # Server A completes two better trials: the median at step 2 becomes 0.2.
    finish(service, sid, 0.1)
    finish(service, sid, 0.2)
    late = other.ask(sid)
    assert other.report(late.id, [MetricInput(2, "loss", 0.5)]) is True
    pruned = other.storage.get_trial(late.id)
    assert pruned.state == "pruned"
    assert pruned.pruned["threshold"] == 0.2 and pruned.pruned["compared_with"] == 3


def test_a_replayed_batch_stores_nothing_new_and_is_not_judged_again(
    service: StudyService, other: StudyService
) -> None:
    sid = create(service)
    finish(service, sid, 1.0)
    t = service.ask(sid)
    batch = [MetricInput(step, name, 0.5) for step in (1, 2) for name in ("loss", "acc")]
    assert service.report(t.id, batch) is False
    assert n_points(service, t.id) == 4
    # The median drops below 0.5, but steps 1 and 2 were judged already: the same batch sent
    # again (to either server) stores nothing and prunes nothing.
    finish(service, sid, 0.1)
    finish(service, sid, 0.2)
    assert other.report(t.id, batch) is False
    assert service.report(t.id, batch) is False
    assert n_points(service, t.id) == 4
    assert service.storage.get_trial(t.id).state == "running"
    # A new step is judged against the new median.
    assert other.report(t.id, [MetricInput(3, "loss", 0.5)]) is True


def _send(service: StudyService, trial_id: int, batch: list, answers: list[bool]) -> None:
    answers.append(service.report(trial_id, batch))


def test_one_batch_sent_at_once_through_two_servers_is_stored_and_judged_once(
    service: StudyService, other: StudyService
) -> None:
    sid = create(service)
    finish(service, sid, 1.0, steps=50)
    for _ in range(5):
        t = service.ask(sid)
        batch = [MetricInput(step, "loss", 0.5) for step in range(1, 51)]
        answers: list[bool] = []
        threads = [
            threading.Thread(target=_send, args=(svc, t.id, batch, answers))
            for svc in (service, other)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert answers == [False, False]
        assert n_points(service, t.id) == 50
        assert service.storage.get_trial(t.id).last_step == 50


class Refusal:
    """A trial of a new study (one retry allowed) whose attempt 1 has reported ``first``,
    and a hook on ``service``'s writes: once the first commit of the next report is done,
    ``resend`` (if any) is reported through ``other`` (a second server), then ``other``
    supersedes the attempt, so that report is refused in its next commit. POINTS_PER_COMMIT
    is 10."""

    def __init__(
        self,
        service: StudyService,
        other: StudyService,
        monkeypatch: pytest.MonkeyPatch,
        first: list[MetricInput],
        resend: list[MetricInput] | None = None,
    ) -> None:
        monkeypatch.setattr(reporting, "POINTS_PER_COMMIT", 10)
        self.service = service
        sid = service.create_study(StudySpec.model_validate(simple_spec("r", max_retries=1))).id
        self.trial = service.ask(sid)
        self.token = attempts.parse(self.trial.attempt_token)
        assert service.report(self.trial.id, first, token=self.token) is False
        self.commits = 0
        self.again: list[Any] = []
        write = service.storage.write

        @contextmanager
        def superseded_after_the_first_commit(**options: Any) -> Iterator[Any]:
            with write(**options) as s:
                yield s
            self.commits += 1
            if self.commits == 1:
                if resend is not None:  # accepted
                    assert other.report(self.trial.id, resend, token=self.token) is False
                other.fail_attempt(self.trial.id, "lost", failure_class="infrastructure")
                self.again.append(other.ask(sid))

        monkeypatch.setattr(service.storage, "write", superseded_after_the_first_commit)

    def refused(self, batch: list[MetricInput]) -> None:
        """Report ``batch``: refused (StaleAttempt) after one commit of it, and one more
        commit (the take-back, or nothing taken back) made."""
        with pytest.raises(StaleAttempt):
            self.service.report(self.trial.id, batch, token=self.token)
        assert self.commits == 2 and self.again[0].attempts == 2


def test_a_batch_refused_in_a_later_commit_takes_back_its_points_step_and_curve(
    service: StudyService, other: StudyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch stored in several commits whose attempt is superseded (by another server)
    after its first commit: the batch is refused and nothing of it stays, not its points,
    not the step it took the trial to (what budget.max_steps charges), not its curve."""
    run = Refusal(service, other, monkeypatch, [MetricInput(1, "loss", 2.0)])
    run.refused([MetricInput(step, "loss", 1.0) for step in range(2, 32)])
    trial = service.storage.get_trial(run.trial.id)
    assert (trial.state, trial.attempts, trial.last_step) == ("running", 2, 1)
    assert [p.step for p in service.storage.metrics(trial.id)] == [1]
    curves, _ = service.storage.curves([trial.id], "loss")
    assert curves[trial.id].points() == ([1], [2.0])


def test_a_refused_batch_keeps_the_points_a_resend_of_it_was_accepted_for(
    service: StudyService, other: StudyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client times out on a batch after its first commit and sends it again through
    another server, which accepts it (its first rows were stored already, so it inserts only
    the rest). The attempt is then superseded and the first request is refused in its next
    commit: it must not take back the rows the accepted resend relies on."""
    batch = [MetricInput(step, "loss", 1.0) for step in range(2, 32)]
    run = Refusal(service, other, monkeypatch, [MetricInput(1, "loss", 2.0)], resend=batch)
    run.refused(batch)
    stored = service.storage.metrics(run.trial.id)
    assert [(p.attempt, p.step) for p in stored] == [(1, step) for step in range(1, 32)]
    assert service.storage.get_trial(run.trial.id).last_step == 31
    curves, _ = service.storage.curves([run.trial.id], "loss")
    assert curves[run.trial.id].points()[0] == list(range(1, 32))


@pytest.mark.parametrize("rest", ["its own steps again", "steps stored before it"])
def test_a_refused_batch_whose_rest_was_stored_by_no_resend_is_taken_back(
    service: StudyService, other: StudyService, monkeypatch: pytest.MonkeyPatch, rest: str
) -> None:
    """The rest of a refused batch is stored, but not by a resend of it: it repeats the
    batch's own first steps (a client's buffer flushed twice), or points an earlier report
    stored. The batch is taken back all the same."""
    before = [MetricInput(1, "loss", 2.0)] + [MetricInput(s, "loss", 0.5) for s in range(20, 30)]
    run = Refusal(service, other, monkeypatch, before)
    head = [MetricInput(step, "loss", 1.0) for step in range(2, 12)]
    run.refused(head + (head if rest == "its own steps again" else before[1:]))
    assert [p.step for p in service.storage.metrics(run.trial.id)] == [1, *range(20, 30)]
    assert service.storage.get_trial(run.trial.id).last_step == 29


def test_a_value_taken_back_after_its_trial_finished_is_kept_by_no_server(
    service: StudyService, other: StudyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch stored in several commits; after its first, the trial is told complete through
    a second server, and both servers ask ASHA's question (each trial's value at a step)
    while the batch's first points are there. The batch is then refused (the trial finished)
    and taken back: neither server answers from memory with a value no longer stored."""
    monkeypatch.setattr(reporting, "POINTS_PER_COMMIT", 10)
    sid = service.create_study(StudySpec.model_validate(simple_spec("t"))).id
    trial = service.ask(sid)
    token = attempts.parse(trial.attempt_token)
    seen: list[dict[int, float]] = []
    commits = 0
    write = service.storage.write

    @contextmanager
    def finished_after_the_first_commit(**options: Any) -> Iterator[Any]:
        nonlocal commits
        with write(**options) as s:
            yield s
        commits += 1
        if commits == 1:
            other.tell(trial.id, value=1.0)
            for svc in (service, other):
                with svc.storage.read() as s:
                    seen.append(metrics.values_at_by_trial(s, sid, "loss", 5))

    monkeypatch.setattr(service.storage, "write", finished_after_the_first_commit)
    batch = [MetricInput(step, "loss", float(step)) for step in range(1, 21)]
    with pytest.raises(TrialFinished):
        service.report(trial.id, batch, token=token)
    assert seen == [{trial.id: 5.0}, {trial.id: 5.0}]
    assert n_points(service, trial.id) == 0  # taken back
    for svc in (service, other):
        with svc.storage.read() as s:
            assert metrics.values_at_by_trial(s, sid, "loss", 5) == {}
