"""How long this process has had a working control plane, so that deadlines which a client
meets by talking to us (a trial's lease, its progress deadline) never run out while we could
not hear it.

The window restarts at process start, at the end of every database outage the storage saw
(the first transaction that succeeds after one that found the database unavailable) and at
the end of every freeze of the process (SIGSTOP, a swapped-out host, a blocked event loop),
seen by the lease sweeper as a sleep that overran its interval by more than
``FREEZE_SLACK_S``. Wall-clock budgets (``budget.timeout_s``, ``trial_timeout_s``) do not
use it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# A sleep that overruns its interval by more than this was a freeze, not scheduling jitter.
FREEZE_SLACK_S = 1.0


class HealthWindow:
    """Tracks the start of the current stretch of working control plane (monotonic time)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._since = clock()
        self._down = False
        self._nap: tuple[float, float] | None = None  # (sleep started, interval) while asleep

    def failed(self) -> None:
        """The database could not be reached (or stayed locked) just now."""
        with self._lock:
            self._down = True
            self._since = max(self._since, self._clock())

    def succeeded(self) -> None:
        """A transaction succeeded; if the last one had failed, an outage ends now."""
        if not self._down:
            return
        with self._lock:
            self._down = False
            self._since = max(self._since, self._clock())

    @contextmanager
    def nap(self, interval: float) -> Iterator[None]:
        """Wrap the sweeper's sleep of ``interval`` seconds; an overrun of more than
        ``FREEZE_SLACK_S`` marks a freeze that ends when the sleep returns."""
        start = self._clock()
        self._nap = (start, interval)
        try:
            yield
        finally:
            self._nap = None
            now = self._clock()
            if now - start > interval + FREEZE_SLACK_S:
                with self._lock:
                    self._since = max(self._since, now)

    def healthy_for(self) -> float:
        """Seconds of working control plane up to now; 0 while the database is failing or
        while the sweeper's sleep has overrun (a freeze it has not yet woken from)."""
        now = self._clock()
        nap = self._nap
        if self._down or (nap is not None and now - nap[0] > nap[1] + FREEZE_SLACK_S):
            return 0.0
        return max(0.0, now - self._since)
