"""This server's hold on the ``scheduler`` lease: one scheduler per database.

:class:`SchedulerLease` wraps the compare-and-set functions of
:mod:`hpo.service.storage.leases` for the scheduler's thread: :meth:`SchedulerLease.hold`
renews the lease (or takes it when it is free, expired or abandoned) and says whether this
server holds it; :attr:`SchedulerLease.held` is judged by this server's own clock, so a
scheduler whose renewals stall stops launching before another server may take over.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from hpo.service.storage import leases
from hpo.service.storage.session import Transactions

log = logging.getLogger("hpo.scheduler")


class SchedulerLease:
    """The scheduler lease as one server holds it (one scheduler thread uses it; :meth:`kept`
    renews it from a helper thread only while that thread is blocked in a long call)."""

    def __init__(self, storage: Transactions, lease_s: float, holder: str | None = None) -> None:
        self.storage = storage
        self.lease_s = lease_s
        self.holder = holder or leases.holder_id()
        self.epoch: int | None = None  # while this server holds the lease
        self._valid_until = 0.0  # monotonic time until which the lease is surely ours
        self._standby_for: str | None = None  # the holder last reported

    @property
    def held(self) -> bool:
        """Whether this server holds the lease now (its last renewal has not run out)."""
        return self.epoch is not None and time.monotonic() < self._valid_until

    def hold(self) -> tuple[bool, bool]:
        """Renew the lease, or take it if it is free; (held now, lost since the last call).

        Raises DatabaseUnavailable when the database cannot be reached.
        """
        started = time.monotonic()
        lost = False
        if self.epoch is not None:
            if leases.renew(self.storage, leases.SCHEDULER, self.holder, self.epoch, self.lease_s):
                self._valid_until = started + self.lease_s
                return True, False
            log.warning("this server lost the scheduler lease (epoch %s)", self.epoch)
            self.epoch, lost = None, True
        epoch = leases.acquire(self.storage, leases.SCHEDULER, self.holder, self.lease_s)
        if epoch is None:
            self._note_standby()
            return False, lost
        self.epoch, self._valid_until, self._standby_for = epoch, started + self.lease_s, None
        log.info("this server runs the scheduler (%s, lease epoch %s)", self.holder, epoch)
        return True, lost

    def still_ours(self) -> bool:
        """Renew now; False (and the lease dropped) when another server has taken it."""
        if self.epoch is not None and leases.renew(
            self.storage, leases.SCHEDULER, self.holder, self.epoch, self.lease_s
        ):
            self._valid_until = time.monotonic() + self.lease_s
            return True
        self.epoch = None
        return False

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """Renew the lease from a helper thread while the block runs: a long call of the
        scheduler thread (a local Ray starting, adopting attempts) must not let it expire."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease_s / 3):
                try:
                    if not self.still_ours():
                        return
                except Exception:  # the database is away: the next round tries again
                    log.warning("could not renew the scheduler lease", exc_info=True)

        keeper = threading.Thread(target=renew, name="hpo-lease-keeper", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            stop.set()
            keeper.join(timeout=self.lease_s)

    def release(self) -> None:
        """Give the lease up now (a standby takes over at once). Never raises."""
        if self.epoch is not None:
            with contextlib.suppress(Exception):
                leases.release(self.storage, leases.SCHEDULER, self.holder, self.epoch)
            self.epoch = None

    def _note_standby(self) -> None:
        lease = leases.get(self.storage, leases.SCHEDULER)
        holder = lease.holder if lease else "?"
        if holder == self._standby_for:
            return
        self._standby_for = holder
        then = (
            "this one serves the API only (it takes over if that server stops)"
            if self.storage.dialect == "sqlite"
            else "this one stands by and takes over when that server's lease expires"
        )
        log.warning("another hpo serve (%s) runs the scheduler on this database; %s", holder, then)
