"""A large metrics batch never holds the write lock in one long commit, and dispatched
attempts get their own token.

The commits are counted on a real database (no timing is asserted here; the figures are in
docs/benchmarks.md, measured by benchmarks/write_lock.py).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from hpo.service import attempts
from hpo.service.errors import DatabaseUnavailable
from hpo.service.executor import AttemptLaunch
from hpo.service.records import MetricInput
from hpo.service.reporting import POINTS_PER_COMMIT
from hpo.service.scheduler import Scheduler
from hpo.service.spec import StudySpec
from hpo.service.storage.session import RETRY_LOCKED_S, WriteQueue
from hpo.service.studies import StudyService
from tests.conftest import simple_spec, wait_for
from tests.service.fake_executor import FakeCluster, FakeExecutor


def _points_per_commit(service: StudyService) -> list[int]:
    """Records, for every commit from now on, how many metric points it inserted."""
    commits: list[int] = []
    pending = [0]

    def inserted(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO METRIC_POINTS"):
            if isinstance(params, list):  # executemany: one parameter set per row
                pending[0] += len(params)
            elif isinstance(params, dict) and "steps" in params:  # unnest: an array literal
                pending[0] += params["steps"].count(",") + 1  # of steps, "{0,1,...}"
            else:  # one statement of many VALUES rows (an insert with RETURNING): flat params
                columns = statement.split("(", 1)[1].split(")", 1)[0].count(",") + 1
                pending[0] += len(params) // columns

    def committed(conn: Any) -> None:
        if pending[0]:
            commits.append(pending[0])
        pending[0] = 0

    event.listen(service.storage.engine, "before_cursor_execute", inserted)
    event.listen(service.storage.engine, "commit", committed)
    return commits


def test_a_large_batch_is_stored_in_short_commits(service: StudyService) -> None:
    study = service.create_study(StudySpec.model_validate(simple_spec("big")))
    trial = service.ask(study.id)
    points = [MetricInput(step, "loss", 1.0 / (step + 1)) for step in range(2_500)]
    commits = _points_per_commit(service)

    assert service.report(trial.id, points, token=attempts.parse(trial.attempt_token)) is False
    assert sum(commits) == 2_500 and max(commits) <= POINTS_PER_COMMIT
    assert len(commits) == 3

    service.report(trial.id, points)  # sent again: stored once
    assert len(service.storage.metrics(trial.id)) == 2_500
    assert service.storage.get_trial(trial.id).last_step == 2_499


class _RecordingExecutor(FakeExecutor):
    def __init__(self) -> None:
        super().__init__(FakeCluster(capacity={"CPU": 2.0}))
        self.launches: list[AttemptLaunch] = []

    def launch(self, launch: AttemptLaunch) -> None:
        self.launches.append(launch)
        super().launch(launch)


def test_dispatched_attempts_get_their_own_token_not_the_admin_token(
    service: StudyService, tmp_path: Path
) -> None:
    spec = simple_spec(
        "dispatched",
        budget={"max_trials": 2},
        resources={"workers_per_trial": 1, "cpus_per_worker": 1},
        trainable={"name": "synthetic", "config": {"steps": 3}},
    )
    service.create_study(StudySpec.model_validate(spec))
    executor = _RecordingExecutor()
    scheduler = Scheduler(
        service, executor, api_url="http://127.0.0.1:1", token="admin", checkpoint_dir=tmp_path
    )
    scheduler.tick()
    assert len(executor.launches) == 2
    for launch in executor.launches:
        token = attempts.parse(launch.token or "")
        assert token is not None and launch.token != "admin"
        assert (token.trial_id, token.attempt) == (launch.trial_id, launch.attempt)
        assert service.storage.attempt_matches(token)


def test_writers_of_one_process_take_their_turns_in_arrival_order() -> None:
    queue = WriteQueue()
    entered: list[str] = []
    waiting = threading.Event()

    def writer(name: str) -> None:
        with queue.turn():
            entered.append(name)

    with queue.turn():
        threads = []
        for name in ("first", "second", "third"):
            thread = threading.Thread(target=writer, args=(name,))
            thread.start()
            threads.append(thread)
            # wait until it has drawn its ticket (arrived) before the next one comes
            wait_for(lambda n=len(threads): queue.waiting() == n, timeout=10, what=name)
        with queue.turn():  # a nested write of the holder passes through
            waiting.set()
    for thread in threads:
        thread.join(timeout=10)
    assert waiting.is_set() and entered == ["first", "second", "third"]


def test_writers_stay_impatient_until_a_write_succeeds_again() -> None:
    """After a writer found the lock held elsewhere, one that comes back after the advised
    Retry-After (1 s) waits only ``IMPATIENT_S`` for it, not a whole ``busy_timeout``; once a
    write succeeds, writers wait the whole ``busy_timeout`` again."""
    queue = WriteQueue()
    with pytest.raises(DatabaseUnavailable), queue.turn(), queue.failing_all():
        raise DatabaseUnavailable("the database is busy: database is locked", retry_after_s=1)
    time.sleep(RETRY_LOCKED_S + 0.2)
    with queue.turn() as impatient, queue.failing_all():
        assert impatient
    with queue.turn() as impatient:
        assert not impatient
