"""How long this process has had a working control plane, so that deadlines which a client
meets by talking to us (a trial's lease, its progress deadline) never run out while we could
not hear it.

The window restarts at process start, at the end of every database outage the storage saw
(the first transaction that succeeds after one that found the database unavailable) and at
the end of every freeze of the process (SIGSTOP, a swapped-out host, a starved interpreter).
A freeze is seen by a heartbeat: :meth:`HealthWindow.watch` runs a thread that calls
:meth:`HealthWindow.beat` every ``interval``; a gap between beats longer than ``interval +
FREEZE_SLACK_S`` was a freeze. Until the next beat after one, :meth:`HealthWindow.healthy_for`
is 0, whichever thread asks first after the process resumes. Wall-clock budgets
(``budget.timeout_s``, ``trial_timeout_s``) do not use it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# A gap between beats longer than the interval plus this was a freeze, not scheduling jitter.
FREEZE_SLACK_S = 1.0


class HealthWindow:
    """Tracks the start of the current stretch of working control plane (monotonic time)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._since = clock()
        self._down = False
        self._beat: tuple[float, float] | None = None  # (last beat, interval) once watched
        self._stop = threading.Event()

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

    def beat(self, interval: float) -> None:
        """The heartbeat, due every ``interval`` seconds; a late one ends a freeze now."""
        now = self._clock()
        with self._lock:
            last = self._beat
            if last is not None and now - last[0] > last[1] + FREEZE_SLACK_S:
                self._since = max(self._since, now)
            self._beat = (now, interval)

    def watch(self, interval: float = 0.25) -> None:
        """Beat every ``interval`` seconds on a daemon thread until :meth:`close`."""
        self._stop.clear()
        self.beat(interval)

        def run() -> None:
            while not self._stop.wait(interval):
                self.beat(interval)

        threading.Thread(target=run, name="hpo-health-beat", daemon=True).start()

    def close(self) -> None:
        """Stop the heartbeat thread."""
        self._stop.set()

    def healthy_for(self) -> float:
        """Seconds of working control plane up to now; 0 while the database is failing or
        while the heartbeat is overdue (a freeze the beat has not yet woken from)."""
        now = self._clock()
        beat = self._beat
        if self._down or (beat is not None and now - beat[0] > beat[1] + FREEZE_SLACK_S):
            return 0.0
        return max(0.0, now - self._since)
