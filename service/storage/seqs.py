"""The studies' change sequences as this process last read them: ETag checks without a read.

A dashboard polls ``GET /studies/{id}`` with the ETag it holds (the study's ``seq``), and is
almost always told 304. Checking that took a database read on a worker thread, and under load
the wait for the thread was most of the poll. :class:`KnownSeqs` keeps each study's ``seq`` as
this process last read it, for at most ``max_age_s``, and forgets it the moment a write of this
process that changed it (or deleted the study) ends; so a poll can be answered on the event
loop:

- a change made through this process shows at once (the write forgets the study's ``seq``
  before it returns; a read that began before that write ended is not kept);
- a change made through another process (a second server on the same database) shows within
  ``max_age_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

# How long a study's seq, as read, answers ETag checks (the most another server's change can
# stay unseen by a poll of this one).
KNOWN_SEQ_S = 1.0


class KnownSeqs:
    """Each study's ``seq`` as read at some time; valid for ``max_age_s`` unless a write of this
    process changed the study since. Holds at most ``MAX_STUDIES`` studies of each kind (read,
    changed): past that it starts afresh, and reads begun before then are not kept."""

    MAX_STUDIES = 10_000

    def __init__(
        self, max_age_s: float = KNOWN_SEQ_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_age_s = max_age_s
        self.clock = clock
        self._lock = threading.Lock()
        self._writes = 0  # writes of this process that changed a study, so far
        self._floor = 0  # reads begun before this many writes are not kept
        self._changed_at: dict[int, int] = {}  # study id -> its last change, as ``_writes``
        self._known: dict[int, tuple[int, float]] = {}  # study id -> (seq, read at)

    def get(self, study_id: int) -> int | None:
        """The study's ``seq`` if it is known and still valid, else None (read it)."""
        known = self._known.get(study_id)
        if known is None or self.clock() - known[1] > self.max_age_s:
            return None
        return known[0]

    def reading(self, study_id: int) -> Callable[[int], None]:
        """Call before reading the study's ``seq``; call what it returns with the seq read. The
        seq is kept unless a write changed the study meanwhile."""
        read_at, writes = self.clock(), self._writes

        def read(seq: int) -> None:
            with self._lock:
                if writes < self._floor or self._changed_at.get(study_id, 0) > writes:
                    return
                if len(self._known) >= self.MAX_STUDIES:
                    self._known.clear()
                self._known[study_id] = (seq, read_at)

        return read

    def changed(self, study_ids: Iterable[int]) -> None:
        """A write of this process that changed these studies (or deleted them) ended."""
        with self._lock:
            self._writes += 1
            if len(self._changed_at) >= self.MAX_STUDIES:
                self._changed_at.clear()
                self._floor = self._writes
            for study_id in study_ids:
                self._changed_at[study_id] = self._writes
                self._known.pop(study_id, None)
