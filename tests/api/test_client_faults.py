"""The client's side of exactly once, against a served control plane over real TCP.

``optimize`` ends every trial it asks for (NaN, None and raised objectives are told failed with
the reason) and heartbeats a long objective; idempotent calls survive connections reset before
or after the server handled them, 503/429 answers and timeouts, within bounded tries; calls
that are not idempotent are not sent twice; the client drops idle connections before the
server does. Faults come from ``FaultyProxy``, an HTTP/1.1 proxy on 127.0.0.1 in front of the
real server that breaks chosen requests.
"""

from __future__ import annotations

import email.utils
import logging
import math
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import BinaryIO
from urllib.parse import urlsplit

import httpx
import pytest

from hpo.api.client import KEEPALIVE_EXPIRY_S, Client, Study, TrialHandle
from hpo.api.retry import RetryPolicy, retry_after_s
from hpo.service.errors import HpoError, NotFound, StudyNotRunning
from tests.conftest import ServerProcess, assert_each_point_stored_once, simple_spec

FAST = RetryPolicy(attempts=4, total_s=20.0, first_wait_s=0.05, max_wait_s=0.5)
UVICORN_KEEPALIVE_S = 5.0  # uvicorn's default timeout_keep_alive, which `hpo serve` keeps
IDLE_S = 3.0  # longer than the client keeps an idle connection, shorter than the server


# ------------------------------------------------------------------ the proxy


@dataclass
class Seen:
    """A request as the proxy received it."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Fault:
    """What to do to the next ``times`` requests whose path contains ``path_part``.

    ``how``: ``reset_before`` (reset the connection, the server never sees the request),
    ``reset_after`` (the server handles it, the answer is replaced by a reset), ``answer``
    (answer ``status`` with ``retry_after`` without asking the server), ``delay`` (hold the
    server's answer ``delay_s`` seconds).
    """

    path_part: str
    how: str
    times: int = 1
    status: int = 503
    retry_after: str | None = None
    delay_s: float = 0.0


@dataclass
class FaultyProxy:
    """An HTTP/1.1 proxy on a free 127.0.0.1 port forwarding to ``upstream``, one request
    at a time per connection, that applies the faults queued with :meth:`fail`."""

    upstream: str
    seen: list[Seen] = field(default_factory=list, repr=False)  # headers carry the token
    connections: int = 0
    _faults: list[Fault] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def fail(self, path_part: str, how: str, **options: object) -> None:
        with self._lock:
            self._faults.append(Fault(path_part, how, **options))  # type: ignore[arg-type]

    def requests_to(self, path_part: str) -> list[Seen]:
        return [s for s in self.seen if path_part in s.path]

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _take(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path_part in path:
                    fault.times -= 1
                    if fault.times == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _serve(self, conn: socket.socket) -> None:
        address = urlsplit(self.upstream)
        with conn, socket.create_connection((address.hostname, address.port)) as up:
            from_client, from_server = conn.makefile("rb"), up.makefile("rb")
            try:
                while (request := _read_message(from_client)) is not None:
                    if not self._forward(conn, up, from_server, request):
                        return
            except OSError:
                return  # the client gave up on this connection (a timeout)

    def _forward(
        self, conn: socket.socket, up: socket.socket, from_server: BinaryIO, request: bytes
    ) -> bool:
        """Handle one request; False when the connection is finished."""
        seen = _parse(request)
        self.seen.append(seen)
        fault = self._take(seen.path)
        how = fault.how if fault else "pass"
        if how == "answer":
            assert fault is not None
            extra = f"Retry-After: {fault.retry_after}\r\n" if fault.retry_after else ""
            body = b'{"error": "unavailable", "message": "injected"}'
            head = (
                f"HTTP/1.1 {fault.status} Injected\r\nContent-Type: application/json\r\n"
                f"{extra}Content-Length: {len(body)}\r\n\r\n"
            )
            conn.sendall(head.encode() + body)
            return True
        if how == "reset_before":
            _reset(conn)
            return False
        up.sendall(request)
        answer = _read_message(from_server)
        if answer is None:
            return False
        if how == "reset_after":
            _reset(conn)
            return False
        if how == "delay":
            assert fault is not None
            time.sleep(fault.delay_s)
        conn.sendall(answer)
        return True


def _read_message(stream: BinaryIO) -> bytes | None:
    """One HTTP/1.1 message (head and Content-Length body), or None at end of stream."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = stream.readline()
        if not line:
            return None
        head += line
    headers = _headers(head)
    assert "chunked" not in headers.get("transfer-encoding", ""), "the proxy reads no chunks"
    return head + stream.read(int(headers.get("content-length", "0")))


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {k.strip().lower(): v.strip() for k, v in pairs}


def _parse(request: bytes) -> Seen:
    method, path, _ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    return Seen(method, path, _headers(request.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"))


def _reset(conn: socket.socket) -> None:
    """Close with a TCP reset (linger 0), as a crashed peer or a middlebox would."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[FaultyProxy]:
    p = FaultyProxy(server.url)
    try:
        yield p
    finally:
        p.close()


def through(proxy: FaultyProxy, server: ServerProcess, **options: object) -> Client:
    return Client(proxy.url, server.token, retry=FAST, **options)  # type: ignore[arg-type]


def events(client: Client, trial_id: int, state: str) -> int:
    return sum(e.state == state for e in client.trial(trial_id).events or [])


# ------------------------------------------------------------------ optimize


def test_optimize_ends_every_trial(
    server: ServerProcess, subtests: pytest.Subtests, caplog: pytest.LogCaptureFixture
) -> None:
    with subtests.test("NaN, inf, None, not a number and raised: failed with the reason"):
        check_bad_results_are_told_failed(server, caplog)
    with subtests.test("KeyboardInterrupt: told failed, then raised"):
        check_interrupt_is_told_then_raised(server)
    with subtests.test("an objective longer than lease_s keeps its trial"):
        check_long_silent_objective_completes(server)
    with subtests.test("a heartbeat's should_stop reaches the objective"):
        check_heartbeat_says_stop(server)


def check_bad_results_are_told_failed(
    server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    results = [math.nan, None, "raise", math.inf, 0.25, -math.inf, "0.5", 1.0]

    def objective(trial: TrialHandle) -> float:
        if results[trial.number] == "raise":
            raise RuntimeError("diverged at step 3")
        return results[trial.number]  # type: ignore[return-value]

    with server.client() as client:
        study = client.create_study(simple_spec("bad-results"))
        with caplog.at_level(logging.WARNING, logger="hpo.api.client"):
            study.optimize(objective, n_trials=len(results), catch=(RuntimeError,))
        trials = study.trials()
        assert [(t.state, t.error, t.value) for t in trials] == [
            ("failed", "objective returned nan", None),
            ("failed", "objective returned None, not a number", None),
            ("failed", "RuntimeError: diverged at step 3", None),
            ("failed", "objective returned inf", None),
            ("complete", None, 0.25),
            ("failed", "objective returned -inf", None),
            ("failed", "objective returned '0.5', not a number", None),
            ("complete", None, 1.0),
        ]
        assert study.record.counts["running"] == 0
    raised = [r for r in caplog.records if r.exc_info and "trial 2" in r.getMessage()]
    assert len(raised) == 1 and "diverged at step 3" in caplog.text
    assert "Traceback" in caplog.text  # the traceback is logged, not only the message


def check_interrupt_is_told_then_raised(server: ServerProcess) -> None:
    def objective(trial: TrialHandle) -> float:
        raise KeyboardInterrupt

    with server.client() as client:
        study = client.create_study(simple_spec("interrupted"))
        with pytest.raises(KeyboardInterrupt):
            study.optimize(objective, n_trials=3, catch=(Exception,))
        [trial] = study.trials()
        assert trial.state == "failed" and trial.error == "KeyboardInterrupt"


def check_long_silent_objective_completes(server: ServerProcess) -> None:
    lease_s = 1.5

    def objective(trial: TrialHandle) -> float:
        time.sleep(3 * lease_s)  # never reports: only the heartbeat keeps the lease
        return 0.5

    with server.client() as client:
        study = client.create_study(simple_spec("long", lease_s=lease_s))
        study.optimize(objective, n_trials=1)
        [trial] = study.trials()
        assert (trial.state, trial.value, trial.attempts) == ("complete", 0.5, 1)
        assert trial.duration_s is not None and trial.duration_s > 2 * lease_s


def check_heartbeat_says_stop(server: ServerProcess) -> None:
    seen: list[float] = []

    def objective(trial: TrialHandle) -> float:
        start = time.monotonic()
        while not trial.should_prune() and time.monotonic() - start < 30:
            time.sleep(0.05)
        seen.append(time.monotonic() - start)
        return 1.0

    with server.client() as client, server.client() as operator:
        study = client.create_study(simple_spec("stopped-while-running", lease_s=1.5))
        threading.Timer(1.0, operator.study(study.id).stop).start()
        study.optimize(objective, n_trials=1)  # the stopped trial's tell is logged, not raised
        assert len(seen) == 1 and seen[0] < 5  # within a few heartbeats, not at the 30 s cap
        [trial] = study.trials()
        assert trial.state == "failed" and study.state == "stopped"
        with pytest.raises(StudyNotRunning):
            study.optimize(objective, n_trials=1)


# ------------------------------------------------------------------ transport faults


def test_idempotent_calls_survive_transport_faults(
    server: ServerProcess, proxy: FaultyProxy, subtests: pytest.Subtests
) -> None:
    with through(proxy, server) as client:
        study = client.create_study(simple_spec("faults"))
        with subtests.test("tell: reset after the server stored it, retried, stored once"):
            t = study.ask()
            proxy.fail("/tell", "reset_after")
            assert study.tell(t, value=0.5).state == "complete"
            assert len(proxy.requests_to(f"/trials/{t.trial_id}/tell")) == 2
            assert client.trial(t.trial_id).value == 0.5
            assert events(client, t.trial_id, "complete") == 1
        with subtests.test("tell failed with a reason: reset before the server saw it"):
            t = study.ask()
            proxy.fail("/tell", "reset_before")
            record = study.tell(t, state="failed", error="objective returned nan")
            assert (record.state, record.error) == ("failed", "objective returned nan")
            assert events(client, t.trial_id, "failed") == 1
        with subtests.test("metrics: reset before the server saw them, one point set stored"):
            t = study.ask()
            proxy.fail("/metrics", "reset_before", times=2)
            assert study.report(t, step=0, metrics={"loss": 1.0, "acc": 0.5}) is False
            assert len(proxy.requests_to(f"/trials/{t.trial_id}/metrics")) == 3
            points = study.metrics(t)
            assert sorted((p.name, p.step, p.value) for p in points) == [
                ("acc", 0, 0.5),
                ("loss", 0, 1.0),
            ]
        with subtests.test("heartbeat and GET: retried after resets"):
            proxy.fail("/heartbeat", "reset_after")
            assert study.heartbeat(t) is False
            proxy.fail(f"/trials/{t.trial_id}", "reset_before")
            assert client.trial(t.trial_id).state == "running"
        with subtests.test("503 with Retry-After: waited for, then retried"):
            proxy.fail("/tell", "answer", status=503, retry_after="1")
            start = time.monotonic()
            assert study.tell(t, value=0.1).value == 0.1
            assert time.monotonic() - start >= 1.0
        with subtests.test("a read timeout on tell: retried, stored once"):
            t = study.ask()
            with through(proxy, server, timeout=1.0) as impatient:
                proxy.fail("/tell", "delay", delay_s=2.0)
                assert impatient.study(study.id).tell(t, value=0.2).value == 0.2
            assert len(proxy.requests_to(f"/trials/{t.trial_id}/tell")) == 2
            assert events(client, t.trial_id, "complete") == 1


def test_retries_are_bounded_and_only_for_idempotent_calls(
    server: ServerProcess, proxy: FaultyProxy, subtests: pytest.Subtests
) -> None:
    with through(proxy, server) as client:
        with subtests.test("create_study is not sent twice after a reset"):
            proxy.fail("/studies", "reset_after")
            with pytest.raises(httpx.TransportError):
                client.create_study(simple_spec("once"))
            assert len(proxy.requests_to("/api/v1/studies")) == 1
            study = client.study("once")  # the server did create it, once
        with subtests.test("create_study is not retried on 503 but is on 429"):
            proxy.fail("/api/v1/studies", "answer", status=503)
            with pytest.raises(HpoError) as unavailable:
                client.create_study(simple_spec("second"))
            assert unavailable.value.status_code == 503
            proxy.fail("/api/v1/studies", "answer", status=429, retry_after="0")
            assert client.create_study(simple_spec("second")).name == "second"
        t = study.ask()
        with subtests.test("tries are bounded in number"):
            proxy.fail("/heartbeat", "reset_before", times=FAST.attempts)
            with pytest.raises(httpx.TransportError):
                study.heartbeat(t)
            assert len(proxy.requests_to("/heartbeat")) == FAST.attempts
            assert study.heartbeat(t) is False  # the next call goes through
        with subtests.test("tries are bounded in time: a long Retry-After is not waited for"):
            bounded = Client(proxy.url, server.token, retry=RetryPolicy(total_s=2.0))
            proxy.fail("/heartbeat", "answer", status=503, retry_after="60")
            start = time.monotonic()
            with pytest.raises(HpoError) as unavailable:
                Study(bounded, study.refresh()).heartbeat(t)
            assert unavailable.value.status_code == 503 and time.monotonic() - start < 2
            bounded.close()


def test_ask_sends_one_idempotency_key_per_ask(server: ServerProcess, proxy: FaultyProxy) -> None:
    with through(proxy, server, timeout=1.0, ask_timeout=10.0) as client:
        study = client.create_study(simple_spec("keys"))
        proxy.fail("/ask", "reset_after")
        first = study.ask()
        proxy.fail("/ask", "delay", delay_s=2.0)  # longer than `timeout`, within `ask_timeout`
        second = study.ask()
        asks = proxy.requests_to("/ask")
        keys = [a.headers["idempotency-key"] for a in asks]
        assert len(asks) == 3 and keys[0] == keys[1] != keys[2]
        assert first.trial_id != second.trial_id


def test_a_retried_ask_creates_one_trial(server: ServerProcess, proxy: FaultyProxy) -> None:
    with through(proxy, server) as client:
        study = client.create_study(simple_spec("one-ask"))
        proxy.fail("/ask", "reset_after")
        asked = study.ask()
        assert [t.id for t in study.trials()] == [asked.trial_id]


def test_a_report_retried_after_its_answer_was_lost_stores_one_point_set(
    server: ServerProcess, proxy: FaultyProxy
) -> None:
    with through(proxy, server) as client:
        study = client.create_study(simple_spec("one-report"))
        t = study.ask()
        proxy.fail("/metrics", "reset_after")
        study.report(t, step=0, metrics={"loss": 1.0})
        assert len(proxy.requests_to("/metrics")) == 2
        assert [(p.step, p.value) for p in study.metrics(t)] == [(0, 1.0)]
    # the read keeps one point per step whatever is stored: the replayed batch's rows
    stored = assert_each_point_stored_once(server.database_url, t.trial_id, 1)
    assert set(stored) == {(t["attempt"], "loss", 0)}


def test_a_delete_sent_again_after_its_answer_was_lost_returns(
    server: ServerProcess, proxy: FaultyProxy
) -> None:
    with through(proxy, server) as client:
        study = client.create_study(simple_spec("deleted-once"))
        study.ask()
        proxy.fail(f"/studies/{study.id}", "reset_after")
        study.delete()  # the server deleted it; the copy sent again finds it gone
        deletes = [r for r in proxy.requests_to(f"/studies/{study.id}") if r.method == "DELETE"]
        assert len(deletes) == 2
        with pytest.raises(NotFound):
            client.study(study.id)
        with pytest.raises(NotFound):  # gone when first asked: the caller's to know
            study.delete()
        proxy.fail(f"/studies/{study.id}", "answer", status=429, retry_after="0")
        with pytest.raises(NotFound):  # a 429 is refused before anything is done
            study.delete()
        proxy.fail(f"/studies/{study.id}", "answer", status=503, retry_after="0")
        study.delete()  # a 503 (a gateway's, say) may have come while the server deleted it


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    def answer(value: str) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value})

    assert retry_after_s(answer("7")) == 7.0
    assert retry_after_s(answer("-3")) == 0.0
    in_ten = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=10))
    assert 8.0 < (retry_after_s(answer(in_ten)) or 0.0) <= 10.0
    assert retry_after_s(answer("Wed, 21 Oct 2015 07:28:00 GMT")) == 0.0  # in the past
    assert retry_after_s(answer("soon")) is None
    assert retry_after_s(httpx.Response(503)) is None


# ------------------------------------------------------------------ keep-alive


def test_idle_connections_are_dropped_before_the_server_drops_them(
    sqlite_server: ServerProcess,
) -> None:
    assert KEEPALIVE_EXPIRY_S < IDLE_S < UVICORN_KEEPALIVE_S
    proxy = FaultyProxy(sqlite_server.url)
    with through(proxy, sqlite_server) as client:
        client.health()
        time.sleep(0.5)
        client.health()
        assert proxy.connections == 1  # kept alive while briefly idle
        time.sleep(IDLE_S)
        client.health()
        assert proxy.connections == 2  # dropped by the client itself
    proxy.close()

    # The server still keeps an idle connection as long: the client always lets go first.
    address = urlsplit(sqlite_server.url)
    request = f"GET /healthz HTTP/1.1\r\nHost: {address.netloc}\r\n\r\n".encode()
    with socket.create_connection((address.hostname, address.port)) as raw:
        stream = raw.makefile("rb")
        raw.sendall(request)
        assert b" 200 " in (_read_message(stream) or b"")
        time.sleep(IDLE_S)
        raw.sendall(request)
        assert b" 200 " in (_read_message(stream) or b"")


def test_wait_rides_out_a_gateway_answering_503_and_gives_up_when_told(
    server: ServerProcess, proxy: FaultyProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway (the proxy) answers 503 while the server behind it restarts or its database
    is away: ``Study.wait`` (as ``hpo watch``) says so once and goes on until it answers."""
    direct = server.client()
    study = direct.create_study(simple_spec("waited-503", budget={"max_trials": 1}))
    study.tell(study.ask(), 1.0)  # the study completes at the server at once
    watched = through(proxy, server).study(study.id)
    path = f"/studies/{study.id}"
    proxy.fail(path, "answer", times=12, status=503)  # three refreshes of 4 tries each
    with caplog.at_level(logging.INFO, logger="hpo.api.client"):
        assert watched.wait(poll_s=0.05, give_up_after_s=60).state == "completed"
    said = [r.getMessage() for r in caplog.records]
    assert sum("does not answer" in m for m in said) == 1, said
    assert any("answers again" in m for m in said), said
    assert len([s for s in proxy.requests_to(path) if s.method == "GET"]) >= 13

    proxy.fail(path, "answer", times=4, status=503)  # one refresh's tries
    with pytest.raises(HpoError, match="HTTP 503"):
        watched.wait(poll_s=0.05, give_up_after_s=0)  # 0: no waiting at all
