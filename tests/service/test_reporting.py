"""Metric reports judged before the write lock: two servers on one database, replays, races."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from hpo.service.db import make_engine
from hpo.service.db.models import MetricPoint
from hpo.service.spec import StudySpec
from hpo.service.storage import Storage
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
