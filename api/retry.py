"""Sending a request again when the first try may not have reached the server, or was refused
for now: the client's part of exactly once.

A call is retried only where a second copy cannot do the work twice. Calls the caller marks
idempotent (every GET, ``tell``, metric points, heartbeats, an ``ask`` carrying its
``Idempotency-Key``) are retried on any transport failure (connection refused or reset, a read
timeout, a broken answer) and on 503 and 429. Any other call is retried only when the request
surely never left (the connection could not be made) or on 429, which the server answers before
doing anything. Waits grow exponentially with jitter, honour ``Retry-After``, and stop at
``RetryPolicy.attempts`` tries or ``RetryPolicy.total_s`` seconds, whichever comes first: with
the defaults, a server that cannot be reached at all is given up on after two to three seconds.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx

log = logging.getLogger(__name__)

# Failures where the request was never written to a connection: safe to send again, always.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

# The key of ``httpx.Response.extensions`` where ``send`` notes whether an earlier copy of the
# request may have reached the server and acted: one whose answer was lost after it was sent,
# or answered 503 (which a gateway may give while the server goes on). Not one that was never
# sent, nor a 429 (the server refuses those before doing anything).
ACTED_BEFORE = "hpo.acted_before"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a request is tried.

    ``attempts`` counts every try (1 means no retry); ``total_s`` bounds the whole call, the
    tries' own time included: no wait starts that would end more than ``total_s`` after the
    first try began (so a call that timed out after ``total_s`` is not sent again); the n-th
    wait is ``first_wait_s * 2**(n-1)`` capped at ``max_wait_s``, randomised down to half, or
    the server's ``Retry-After`` when that is longer.
    """

    attempts: int = 6
    total_s: float = 60.0
    first_wait_s: float = 0.1
    max_wait_s: float = 10.0

    def backoff_s(self, tries: int) -> float:
        """The wait after ``tries`` failed tries, before ``Retry-After`` is considered."""
        wait = min(self.max_wait_s, self.first_wait_s * 2 ** (tries - 1))
        return wait * random.uniform(0.5, 1.0)


NO_RETRY = RetryPolicy(attempts=1)


def retry_after_s(response: httpx.Response) -> float | None:
    """The answer's ``Retry-After`` in seconds from now (delta-seconds or an HTTP date)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def send(
    http: httpx.Client,
    request: httpx.Request,
    *,
    idempotent: bool,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
) -> httpx.Response:
    """Send ``request`` and return the answer, trying again as the module docstring says.

    The same request (headers included, so an ``Idempotency-Key`` too) goes out every time.
    Returns the answer (the last one when tries run out on 503/429), its
    ``extensions[ACTED_BEFORE]`` saying whether an earlier copy may have done the work; raises
    the last
    ``httpx.TransportError`` when they run out on transport failures, or at once for a
    transport failure of a call that is not idempotent and may have been sent.
    """
    deadline = time.monotonic() + policy.total_s
    tries = 0
    acted_before = False
    while True:
        tries += 1
        try:
            response = http.send(request)
        except httpx.TransportError as exc:
            if not (idempotent or isinstance(exc, NOT_SENT)):
                raise
            wait = policy.backoff_s(tries)
            if tries >= policy.attempts or time.monotonic() + wait > deadline:
                raise
            acted_before = acted_before or not isinstance(exc, NOT_SENT)
            reason = f"{type(exc).__name__}: {exc}"
        else:
            response.extensions[ACTED_BEFORE] = acted_before
            if not _retryable_status(response.status_code, idempotent):
                return response
            wait = max(policy.backoff_s(tries), retry_after_s(response) or 0.0)
            if tries >= policy.attempts or time.monotonic() + wait > deadline:
                return response
            response.close()
            acted_before = acted_before or response.status_code == 503
            reason = f"HTTP {response.status_code}"
        log.info(
            "%s %s failed (%s); try %d of %d in %.1f s",
            request.method,
            request.url.path,
            reason,
            tries + 1,
            policy.attempts,
            wait,
        )
        sleep(wait)


def _retryable_status(status: int, idempotent: bool) -> bool:
    return status == 429 or (status == 503 and idempotent)


# Answers of a server that is there but cannot serve now (a gateway before one that restarts,
# or a database outage): a waiting loop may look again later.
UNAVAILABLE_STATUS = (502, 503, 504)


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a client call after its retries, says the server cannot be
    reached or cannot serve for now (a restart, a database outage), not that the request was
    wrong: a loop that waits for a study may ride it out."""
    if isinstance(exc, httpx.TransportError):
        return True
    return getattr(exc, "status_code", None) in UNAVAILABLE_STATUS


class Outage:
    """How long a waiting loop has gone without an answer: ``failed`` at each call that
    raised an :func:`unavailable` error (re-raises it once ``give_up_s`` have passed since the
    first of them, at once when that is 0, and at once for any other error), ``answered`` at
    each that worked. Returns what to tell the user: at the first failure of an outage, and
    when the server is back. The clock starts when a call has used up its own retries (a
    few seconds), so an outage is given up on that much later than ``give_up_s``."""

    def __init__(self, give_up_s: float) -> None:
        self.give_up_s = give_up_s
        self.since: float | None = None

    def failed(self, exc: BaseException) -> str | None:
        if not unavailable(exc):
            raise exc
        now = time.monotonic()
        if self.since is None:
            if self.give_up_s <= 0:
                raise exc
            self.since = now
            return (
                f"the hpo server does not answer ({type(exc).__name__}: {exc}); waiting up "
                f"to {self.give_up_s:g} s for it to come back"
            )
        if now - self.since >= self.give_up_s:
            raise exc
        return None

    def answered(self) -> str | None:
        if self.since is None:
            return None
        gone_s, self.since = time.monotonic() - self.since, None
        return f"the hpo server answers again (after {gone_s:.0f} s)"
