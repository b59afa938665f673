"""The metric reporter against a real control plane that goes away and comes back."""

from __future__ import annotations

import time
from pathlib import Path

from hpo.workers.reporter import MetricReporter
from tests.api.test_metrics_endpoint import scrape, value
from tests.conftest import ServerProcess, assert_each_point_stored_once, simple_spec


def test_points_survive_an_absent_control_plane(sqlite_server: ServerProcess) -> None:
    client = sqlite_server.client()
    study = client.create_study(simple_spec("stream"))
    trial = study.ask()
    sqlite_server.kill()  # the control plane is gone while training goes on

    reporter = MetricReporter(
        sqlite_server.url, trial.trial_id, token=sqlite_server.token, flush_s=0.05
    )
    started = time.monotonic()
    tickets = [reporter.log(step, {"loss": 1.0 / (step + 1), "lr": 0.1}) for step in range(50)]
    assert time.monotonic() - started < 0.5  # logging never waits for the network
    assert reporter.wait_sent(tickets[-1], timeout=1.0) is False
    assert reporter.failures >= 1

    sqlite_server.start()  # back on the same port and database
    assert reporter.wait_sent(tickets[-1], timeout=30.0) is True
    assert reporter.close(timeout=10)
    points = sqlite_server.client().study(study.id).metrics(trial.trial_id, "loss")
    assert [p.step for p in points] == list(range(50))  # none lost, none twice, in order


def test_bounded_buffer_drops_the_oldest_side_metrics_first(sqlite_server: ServerProcess) -> None:
    client = sqlite_server.client()
    study = client.create_study(simple_spec("bounded"))
    trial = study.ask()
    sqlite_server.kill()
    reporter = MetricReporter(
        sqlite_server.url,
        trial.trial_id,
        token=sqlite_server.token,
        keep=("loss",),
        max_points=30,
        flush_s=0.05,
    )
    for step in range(20):
        reporter.log(step, {"loss": float(step), "train_loss": float(step)})
    assert reporter.dropped == 10  # 40 points for 30 places: only train_loss points went
    sqlite_server.start()
    assert reporter.close(timeout=30)
    study = sqlite_server.client().study(study.id)
    assert len(study.metrics(trial.trial_id, "loss")) == 20
    assert [p.step for p in study.metrics(trial.trial_id, "train_loss")] == list(range(10, 20))


def test_a_finished_trial_tells_the_reporter_to_stop(sqlite_server: ServerProcess) -> None:
    client = sqlite_server.client()
    study = client.create_study(simple_spec("finished"))
    trial = study.ask()
    study.tell(trial, value=1.0)
    reporter = MetricReporter(sqlite_server.url, trial.trial_id, token=sqlite_server.token)
    ticket = reporter.log(1, {"loss": 0.5})
    assert reporter.wait_sent(ticket, timeout=10)
    assert reporter.should_stop and reporter.finished
    reporter.close(timeout=1)


def test_heartbeats_keep_the_lease(sqlite_server: ServerProcess) -> None:
    client = sqlite_server.client()
    study = client.create_study(simple_spec("beats", lease_s=1.5))
    trial = study.ask()
    reporter = MetricReporter(
        sqlite_server.url, trial.trial_id, token=sqlite_server.token, heartbeat_s=0.3
    )
    time.sleep(4)  # no metrics at all, only heartbeats
    assert client.trial(trial.trial_id).state == "running"
    reporter.close(timeout=5)
    time.sleep(3)
    assert client.trial(trial.trial_id).state == "failed"  # and without them it expires


def _reports_answered(server: ServerProcess) -> float:
    samples = scrape(server)
    return value(samples, "hpo_report_duration_seconds_count") or 0.0


def test_a_trial_that_logs_every_step_sends_a_batch_per_flush_interval(
    sqlite_server: ServerProcess,
) -> None:
    """A trial that logs a point every 5 ms sends one request per ``flush_s`` (3 s here), not
    one per point (before, every ``log`` woke the sender: ~100 requests a second from one
    trial), and a point someone waits for (``ctx.report``, a checkpoint) goes at once, not
    ``flush_s`` after the last batch. Requests counted by the server's own histogram of the
    reports it answered."""
    client = sqlite_server.client()
    study = client.create_study(simple_spec("paced"))
    trial = study.ask()
    before = _reports_answered(sqlite_server)
    reporter = MetricReporter(
        sqlite_server.url, trial.trial_id, token=sqlite_server.token, flush_s=3.0
    )
    started = time.monotonic()
    for step in range(300):
        reporter.log(step, {"loss": 1.0 / (step + 1)})
        time.sleep(0.005)
    logging_s = time.monotonic() - started
    ticket = reporter.log(300, {"loss": 0.001})
    asked = time.monotonic()
    assert reporter.wait_sent(ticket, timeout=10)
    waited = time.monotonic() - asked
    reporter.close(timeout=10)
    requests = _reports_answered(sqlite_server) - before
    assert 1 <= requests <= logging_s / 3.0 + 3, (requests, logging_s)
    assert waited < 1.0, waited  # not held until flush_s after the last batch (~1.5 s on)
    points = sqlite_server.client().study(study.id).metrics(trial.trial_id, "loss")
    assert [p.step for p in points] == list(range(301))  # none lost, none twice, in order


def test_heartbeats_come_every_heartbeat_s_not_every_flush_s(sqlite_server: ServerProcess) -> None:
    """With nothing to send, the sender wakes for the next heartbeat, not only every
    ``flush_s``: heartbeats every 0.3 s with ``flush_s`` 1 s (else a lease of 4·heartbeat_s,
    as the runner sets it, would be renewed only every other ``flush_s``)."""
    client = sqlite_server.client()
    study = client.create_study(simple_spec("beat-often"))
    trial = study.ask()
    route = "/api/v1/trials/{trial_id}/heartbeat"

    def beats() -> float:
        samples = scrape(sqlite_server)
        return (
            value(samples, "hpo_http_requests_total", route=route, method="POST", status="200")
            or 0.0
        )

    before = beats()
    reporter = MetricReporter(
        sqlite_server.url, trial.trial_id, token=sqlite_server.token, heartbeat_s=0.3, flush_s=1.0
    )
    time.sleep(3)
    reporter.close(timeout=5)
    assert beats() - before >= 6  # ~9 at 0.3 s; 3 when rounded up to flush_s


def test_points_refused_by_the_rate_limit_are_sent_again_not_dropped(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A 429 says "later", not "never": the batch is kept and sent again after its
    Retry-After, as after a 5xx (it was dropped like a 4xx that will not get better)."""
    limits = {"HPO_SCHEDULER": "false", "HPO_RATE_LIMIT_PER_S": "4", "HPO_RATE_LIMIT_BURST": "2"}
    with ServerProcess(sqlite_url, tmp_path, limits) as server:
        trial = server.client().create_study(simple_spec("limited")).ask()
        token = trial.attempt_token
        reporter = MetricReporter(server.url, trial.trial_id, token=token, flush_s=0.0)
        for step in range(12):  # a batch each: waited for, as ctx.report does
            reporter.wait_sent(reporter.log(step, {"loss": 1.0 / (step + 1)}), timeout=0.05)
        assert reporter.close(timeout=60)
        assert reporter.failures > 0  # the limit was met: the drill proved something
        assert reporter.dropped == 0
        rows = assert_each_point_stored_once(server.database_url, trial.trial_id, 12)
        assert sorted(step for _, _, step in rows) == list(range(12))


def test_points_trimmed_while_a_batch_is_on_its_way_are_the_queued_ones(
    sqlite_server: ServerProcess,
) -> None:
    """The buffer overflows while a batch is being sent (training goes on): the points
    dropped are queued ones, counted, never the batch on its way. Dropping from the batch
    let the sender's acknowledgement pop points that were never sent (a kept metric among
    them) and count them as sent. Bad points are refused at ``log``, not with their batch."""
    import threading

    import httpx
    import pytest

    client = sqlite_server.client()
    study = client.create_study(simple_spec("in-flight"))
    trial = study.ask()
    first, release = threading.Event(), threading.Event()

    def hold_the_first_batch(request: httpx.Request) -> None:
        if request.url.path.endswith("/metrics") and not first.is_set():
            first.set()
            release.wait(30)

    http = httpx.Client(
        base_url=sqlite_server.url,
        headers={"Authorization": f"Bearer {sqlite_server.token}"},
        event_hooks={"request": [hold_the_first_batch]},
        timeout=30,
    )
    reporter = MetricReporter(
        sqlite_server.url,
        trial.trial_id,
        keep=("val_loss",),
        max_points=10,
        batch=5,
        flush_s=0.01,
        client=http,
    )
    for step in range(5):
        reporter.log(step, {"t": float(step)})
    assert first.wait(10), "the first batch was never sent"
    reporter.log(0, {"val_loss": 0.5})
    for step in range(8):
        reporter.log(step, {"u": float(step)})
    assert reporter.dropped == 4  # 14 points for 10 places, the batch of 5 on its way
    release.set()
    assert reporter.close(timeout=30)
    stored = {(p.name, p.step) for p in client.study(study.id).metrics(trial.trial_id)}
    assert stored == {("t", s) for s in range(5)} | {("val_loss", 0)} | {
        ("u", s) for s in range(4, 8)
    }
    with pytest.raises(ValueError, match="step"):
        reporter.log(-1, {"loss": 1.0})
    with pytest.raises(ValueError, match="metric name"):
        reporter.log(1, {"x" * 129: 1.0})
