"""Streams a trial's metric points to the control plane over HTTP, without stalling training.

Points go into a bounded buffer that a background thread sends in batches, at most one
batch every ``flush_s`` (a trial that logs every step sends one request a second by default,
however fast it steps), except that a batch someone waits for (:meth:`MetricReporter.wait_sent`:
``ctx.report``, a checkpoint, ``close``) or a full one goes at once. A slow or absent
control plane never blocks ``log``; the thread retries with back-off and sends what waited once
the server answers again. The server's answers carry the early-stop decision. Between batches
the thread sends heartbeats, which keep the trial's lease alive.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import httpx
from pydantic import TypeAdapter, ValidationError

from hpo.api.retry import retry_after_s
from hpo.service.spec import MAX_STEP, MetricName
from hpo.workers.tensorboard import LiveScalars

log = logging.getLogger("hpo.workers.reporter")
_METRIC_NAME = TypeAdapter(MetricName)


# Answers that say "not now" (a timeout, the rate limit): the batch is kept and sent again,
# as after a 5xx, once the answer's Retry-After has passed (waited at most a heartbeat's
# interval at a time, so the lease is renewed meanwhile, and cut short by close()).
TRY_AGAIN = (408, 429)


class MetricReporter:
    """Rank 0's link to ``POST /api/v1/trials/{id}/metrics``.

    ``max_points`` bounds memory: when the server stays away that long, the oldest points that
    are not in ``keep`` (the objective and pruned metrics) are dropped first, and counted.
    ``mirror``: also hands every point to it as it is logged (the live TensorBoard scalars,
    :class:`hpo.workers.tensorboard.LiveScalars`), and closes it with the reporter.
    ``flush_s``: the least time between two batches, unless a caller waits for its points or
    ``batch`` of them are queued (the server's load then grows with the trials, not with how
    often they log). So a stop or pause decided on points sent by :meth:`log` alone reaches
    ``should_stop`` up to ``flush_s`` later than one that :meth:`wait_sent` asked for.
    """

    def __init__(
        self,
        api_url: str,
        trial_id: int,
        *,
        token: str | None = None,
        keep: tuple[str, ...] = (),
        heartbeat_s: float = 10.0,
        flush_s: float = 1.0,
        batch: int = 500,
        max_points: int = 100_000,
        client: httpx.Client | None = None,
        mirror: LiveScalars | None = None,
    ) -> None:
        self.trial_id = trial_id
        self.mirror = mirror
        self.keep = set(keep)
        self.heartbeat_s = heartbeat_s
        self.flush_s = flush_s
        self.batch = batch
        self.max_points = max_points
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = client or httpx.Client(base_url=api_url, headers=headers, timeout=10.0)
        self._buffer: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._sent = 0  # points acknowledged by the server
        self._queued = 0  # points ever queued
        self._stop = threading.Event()
        self.should_stop = False
        self.finished = False  # the server says the trial takes no more points
        self.dropped = 0
        self.failures = 0
        self._last_contact = 0.0
        self._last_batch = 0.0  # when the last batch was sent (monotonic)
        self._waiters = 0  # callers of wait_sent: their points go without waiting for flush_s
        self._in_flight = 0  # the first points of the buffer, being sent: _trim keeps them
        self._wait_s = 0.0  # the Retry-After of the last answer that said "later"
        self._thread = threading.Thread(target=self._run, name="hpo-reporter", daemon=True)
        self._thread.start()

    def log(self, step: int, metrics: dict[str, float]) -> int:
        """Queue points; returns a ticket to pass to :meth:`wait_sent`. Raises ValueError for a
        point the server would refuse (a step outside 0 .. 2**62, a name that is empty, over
        128 characters or holds a NUL): it would take the valid points of its batch with it."""
        for name in metrics:  # the rule the server's points are held to
            try:
                _METRIC_NAME.validate_python(name)
            except ValidationError as exc:
                raise ValueError(f"metric name {name!r}: {exc.errors()[0]['msg']}") from None
        if not 0 <= int(step) <= MAX_STEP:
            raise ValueError(f"step {step}: must be 0 .. 2**62")
        with self._cond:
            idle = not self._buffer  # else the sender holds them until the next batch is due
            for name, value in metrics.items():
                self._buffer.append({"step": int(step), "name": name, "value": float(value)})
                self._queued += 1
            self._trim()
            if idle or len(self._buffer) >= self.batch:
                self._cond.notify()
            ticket = self._queued
        if self.mirror is not None:
            self.mirror.add(step, metrics)
        return ticket

    @property
    def sent(self) -> int:
        """How many points the server acknowledged (dropped ones aside)."""
        with self._cond:
            return self._sent - self.dropped

    def unsent(self) -> list[dict[str, Any]]:
        """The points queued but not yet acknowledged by the server (``step``, ``name``,
        ``value``), oldest first."""
        with self._cond:
            return [dict(point) for point in self._buffer]

    def reported(self, name: str) -> list[tuple[int, float]]:
        """The (step, value) points of ``name`` the control plane already holds for this trial
        (what earlier attempts reported); empty if it cannot be reached."""
        try:
            answer = self._http.get(
                f"/api/v1/trials/{self.trial_id}/metrics", params={"name": name}, timeout=10
            )
            answer.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("could not read earlier metrics of trial %s: %s", self.trial_id, exc)
            return []
        return [(int(p["step"]), float(p["value"])) for p in answer.json()["points"]]

    def wait_sent(self, ticket: int, timeout: float) -> bool:
        """Wait until the points up to ``ticket`` were acknowledged (or timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiters += 1
            self._cond.notify_all()
            try:
                while self._sent < ticket and not self.finished:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._waiters -= 1
        return True

    def close(self, timeout: float = 30.0) -> bool:
        """Send what is buffered (waiting up to ``timeout``), then stop the thread."""
        sent = self.wait_sent(self._queued, timeout)
        self._stop.set()
        with self._cond:
            self._cond.notify()
        self._thread.join(timeout=5)
        self._http.close()
        if self.mirror is not None:
            self.mirror.close()
        return sent

    def _trim(self) -> None:
        excess = len(self._buffer) - self.max_points
        if excess <= 0:
            return
        kept = deque()
        for i, point in enumerate(self._buffer):
            flying = i < self._in_flight  # the batch being sent: the sender pops it after
            if excess > 0 and not flying and point["name"] not in self.keep:
                excess -= 1
                self.dropped += 1
                self._sent += 1  # never coming: do not wait for it
                continue
            kept.append(point)
        self._buffer = kept

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set() and not self.finished:
            with self._cond:
                if not self._buffer:
                    self._cond.wait(backoff or self._idle_s())
                hold = self._hold_s()
                if hold > 0:  # woken by a log() before the next batch is due
                    self._cond.wait(hold)
                    continue
                batch = [self._buffer[i] for i in range(min(self.batch, len(self._buffer)))]
                self._in_flight = len(batch)
            if not batch and time.monotonic() - self._last_contact < self.heartbeat_s:
                continue
            if batch:
                self._last_batch = time.monotonic()
            sent = self._send(batch)
            with self._cond:
                self._in_flight = 0
                if sent:
                    for _ in batch:
                        self._buffer.popleft()
                    self._sent += len(batch)
                    self._cond.notify_all()
            if sent:
                backoff = 0.0
            else:
                backoff = min(5.0, max(0.2, backoff * 2))
                self._stop.wait(min(max(backoff, self._wait_s), self.heartbeat_s))
                self._wait_s = 0.0

    def _idle_s(self) -> float:
        """How long the sender sleeps with nothing queued: until the next heartbeat is due,
        ``flush_s`` at most."""
        due = self._last_contact + self.heartbeat_s - time.monotonic()
        return min(self.flush_s, max(due, 0.01))

    def _hold_s(self) -> float:
        """How long the queued points wait before they go (called holding the lock): until
        ``flush_s`` after the last batch, unless someone waits for them, a full batch is
        queued, or the reporter stops."""
        if (
            not self._buffer
            or self._waiters
            or len(self._buffer) >= self.batch
            or self._stop.is_set()
        ):
            return 0.0
        return self._last_batch + self.flush_s - time.monotonic()

    def _send(self, batch: list[dict[str, Any]]) -> bool:
        path = f"/api/v1/trials/{self.trial_id}/" + ("metrics" if batch else "heartbeat")
        try:
            answer = self._http.post(path, json={"points": batch} if batch else None)
        except httpx.HTTPError as exc:
            self.failures += 1
            log.warning("control plane unreachable (%s); keeping %d points", exc, len(batch))
            return False
        self._last_contact = time.monotonic()
        if answer.status_code in (404, 409):  # trial finished, failed or deleted
            self.should_stop = True
            self.finished = True
            with self._cond:
                self._cond.notify_all()
            return True
        if answer.status_code >= 400:
            self.failures += 1
            log.warning("metrics refused: %s %s", answer.status_code, answer.text[:500])
            if answer.status_code in TRY_AGAIN or answer.status_code >= 500:
                self._wait_s = retry_after_s(answer) or 0.0  # kept: sent again after it
                return False
            self.dropped += len(batch)  # any other 4xx will not get better: counted, dropped
            return True
        if answer.json().get("should_stop"):
            self.should_stop = True
        return True
