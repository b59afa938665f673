"""Drill: the database goes away for several seconds while trials stream metrics and pages poll.

Every answer during the outage is a 503 with ``Retry-After`` (never a 500, never a dropped
connection), ``/healthz`` says why, and once the database is back every point that was retried
after a 503 is stored exactly once: nothing lost, nothing duplicated, no restart needed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from hpo.workers.reporter import MetricReporter
from tests.conftest import ServerProcess, assert_each_point_stored_once, simple_spec
from tests.faults.conftest import OwnPostgres

STEPS = 200


class Stream:
    """Posts one metric point per step, resending a step until it is answered 200."""

    def __init__(self, server: ServerProcess, trial_id: int, fresh: bool = False) -> None:
        self.server, self.trial_id, self.fresh = server, trial_id, fresh
        self.codes: Counter[int] = Counter()
        self.dropped = 0
        self.missing_retry_after = 0
        self.failures: list[BaseException] = []  # what its thread raised, for the test's

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # an exception in a thread only warns: the test asserts
            self.failures.append(exc)

    def _run(self) -> None:
        with server_http(self.server, self.fresh) as http:
            for step in range(1, STEPS + 1):
                body = {"points": [{"step": step, "name": "loss", "value": 1.0 / step}]}
                for _ in range(600):
                    try:
                        r = http.post(f"/api/v1/trials/{self.trial_id}/metrics", json=body)
                    except httpx.TransportError:
                        self.dropped += 1
                        time.sleep(0.2)
                        continue
                    self.codes[r.status_code] += 1
                    if r.status_code == 200:
                        break
                    if r.status_code == 503:
                        if "retry-after" not in r.headers:
                            self.missing_retry_after += 1
                        time.sleep(min(float(r.headers.get("retry-after", 1)), 0.5))
                        continue
                    raise AssertionError(f"step {step}: {r.status_code} {r.text}")
                time.sleep(0.02)


class Poller:
    def __init__(self, server: ServerProcess, study_id: int, fresh: bool = False) -> None:
        self.server, self.study_id, self.fresh = server, study_id, fresh
        self.codes: Counter[int] = Counter()
        self.dropped = 0
        self.done = threading.Event()

    def run(self) -> None:
        with server_http(self.server, self.fresh) as http:
            while not self.done.is_set():
                try:
                    r = http.get(f"/api/v1/studies/{self.study_id}")
                    self.codes[r.status_code] += 1
                except httpx.TransportError:
                    self.dropped += 1
                time.sleep(0.05)


def started(stream: Stream, poller: Poller) -> list[threading.Thread]:
    """The stream and the poller, each running in a thread of its own."""
    threads = [threading.Thread(target=stream.run), threading.Thread(target=poller.run)]
    for t in threads:
        t.start()
    return threads


def finished(threads: list[threading.Thread], poller: Poller) -> None:
    """Wait for the stream to end (it must, once the database is back), then stop polling."""
    threads[0].join(timeout=180)
    poller.done.set()
    threads[1].join(timeout=30)
    assert not threads[0].is_alive(), "the stream did not finish after the database returned"


def assert_nothing_lost(
    points: list[dict], stream: Stream, poller: Poller, database_url: str
) -> None:
    """Every step of the stream stored once (read back, and as rows of the database: the
    read keeps one point per step whatever is stored), and no answer a 500, a dropped
    connection or a 503 without ``Retry-After``."""
    assert stream.failures == [], stream.failures
    steps = Counter(p["step"] for p in points)
    lost = [s for s in range(1, STEPS + 1) if steps[s] == 0]
    duplicated = [s for s, n in steps.items() if n > 1]
    assert (lost, duplicated) == ([], [])
    stored = assert_each_point_stored_once(
        database_url, stream.trial_id, STEPS, across_attempts=True
    )
    assert {(name, step) for _, name, step in stored} == {("loss", s) for s in range(1, STEPS + 1)}
    assert stream.codes[500] == poller.codes[500] == 0
    assert stream.dropped == poller.dropped == 0
    assert stream.missing_retry_after == 0


def server_http(server: ServerProcess, fresh: bool) -> httpx.Client:
    """A client of ``server``; ``fresh``: one that closes its connection after each answer,
    so that each request is accepted anew (by any worker of ``hpo serve --workers N``)."""
    http = server.http()
    if fresh:
        http.headers["Connection"] = "close"
    return http


def test_database_outage_answers_503_and_loses_nothing(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    server = ServerProcess(own_postgres.url, tmp_path, {"HPO_SCHEDULER": "false"})
    server.start()
    reporter: MetricReporter | None = None
    try:
        with server.http() as http:
            study = http.post("/api/v1/studies", json=simple_spec("outage", lease_s=600)).json()
            trial = http.post(f"/api/v1/studies/{study['id']}/ask").json()
            worker_trial = http.post(f"/api/v1/studies/{study['id']}/ask").json()
        stream, poller = Stream(server, trial["trial_id"]), Poller(server, study["id"])
        threads = started(stream, poller)
        # and a worker's own reporter (its attempt token, its batches and back-off), logging
        # a point every 20 ms through the outage as a training loop does
        reporter = MetricReporter(
            server.url, worker_trial["trial_id"], token=worker_trial["attempt_token"], flush_s=0.2
        )
        logging = threading.Thread(target=_log_steps, args=(reporter,))
        logging.start()
        time.sleep(1.5)
        own_postgres.stop("immediate")
        time.sleep(2)
        health = httpx.get(server.url + "/healthz", timeout=10)
        assert health.status_code == 503, health.text
        assert "database" in health.text.lower()
        time.sleep(5)
        own_postgres.start()
        finished(threads, poller)
        logging.join(timeout=60)
        assert reporter.close(timeout=60), f"unsent after the outage: {len(reporter.unsent())}"

        with server.http() as http:
            points = http.get(f"/api/v1/trials/{trial['trial_id']}/metrics").json()["points"]
            assert httpx.get(server.url + "/healthz").status_code == 200
        assert_nothing_lost(points, stream, poller, server.database_url)
        assert stream.codes[503] > 0, "the outage was never seen: the drill proved nothing"
        # the reporter's points: each step once, none dropped, though it met the outage too
        assert (reporter.dropped, reporter.failures > 0) == (0, True), reporter.failures
        rows = assert_each_point_stored_once(
            server.database_url, worker_trial["trial_id"], STEPS, name="loss"
        )
        assert {step for _, _, step in rows} == set(range(1, STEPS + 1))
    finally:
        if reporter is not None:  # its thread would go on sending to a later server's port
            reporter.close(timeout=0)
        server.stop()


def _log_steps(reporter: MetricReporter) -> None:
    """Log STEPS points, one every 20 ms, without waiting for the server (``ctx.log``)."""
    for step in range(1, STEPS + 1):
        reporter.log(step, {"loss": 1.0 / step})
        time.sleep(0.02)


def test_study_user_attrs_ride_out_the_database_away_for_20_s(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    """A study's user attributes merged while PostgreSQL is down for 20 s: a client whose
    retries outlast the outage gets its merge through once (after the outage, not before);
    one that gives up first raises, and its merge is not stored (nothing wrongly accepted)."""
    from hpo.api.client import Client, RetryPolicy

    server = ServerProcess(own_postgres.url, tmp_path, {"HPO_SCHEDULER": "false"})
    server.start()
    try:
        patient = Client(server.url, token=server.token, retry=RetryPolicy(30, 90.0, 0.5, 3.0))
        hasty = Client(server.url, token=server.token, retry=RetryPolicy(2, 5.0))
        study = patient.create_study(simple_spec("attrs-outage"))
        study.set_study_user_attrs({"before": 1})
        outcome: dict[str, object] = {}
        handles = {"patient": patient.study(study.id), "hasty": hasty.study(study.id)}
        own_postgres.stop("immediate")
        down_at = time.monotonic()
        threads = [
            threading.Thread(target=lambda k=k: _merge_into(handles[k], k, outcome))
            for k in handles
        ]
        for t in threads:
            t.start()
        time.sleep(20)
        own_postgres.start()
        up_at = time.monotonic()
        for t in threads:
            t.join(timeout=120)
        assert outcome["patient"][0] == "stored" and outcome["patient"][1] >= up_at - 1
        assert outcome["hasty"][0] == "refused", outcome
        attrs = patient.study(study.id).record.spec["user_attrs"]
        assert attrs == {"before": 1, "patient": 2}, attrs  # none lost, none wrongly kept
        assert up_at - down_at >= 20
    finally:
        server.stop()


def _merge_into(study: object, key: str, outcome: dict[str, object]) -> None:
    from hpo.service.errors import HpoError

    try:
        study.set_study_user_attrs({key: 2})  # type: ignore[attr-defined]
        outcome[key] = ("stored", time.monotonic())
    except (HpoError, httpx.TransportError) as exc:
        outcome[key] = ("refused", type(exc).__name__)
