"""Transactions, and the one place where database failures become a domain error.

Every read and write of the core runs inside :meth:`Transactions.write` or
:meth:`Transactions.read`. A failure of the database itself (connection refused or lost, server
down, database dropped, lock timeout, SQLite's "database is locked") leaves that scope as
:class:`~hpo.service.errors.DatabaseUnavailable`, which the API answers with 503 and
``Retry-After``; the transaction is rolled back, so nothing of it was stored. Errors of the
request itself (a unique name taken, a domain error raised inside the scope) pass unchanged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event, inspect, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from hpo.service.db.models import Study
from hpo.service.errors import DatabaseUnavailable
from hpo.service.health import HealthWindow
from hpo.service.storage.seqs import KnownSeqs

# Seconds a client should wait before retrying: a busy SQLite file frees up quickly, a server
# that is down or restarting takes longer.
RETRY_LOCKED_S = 1
RETRY_DOWN_S = 5
# How long a write that found the database locked or unreachable keeps /healthz at 503 when
# no write has succeeded since (and, on SQLite, keeps the writers that come impatient).
WRITE_TROUBLE_S = 5.0
# How long a writer waits for the SQLite lock while another found it held elsewhere and no
# write has succeeded since.
IMPATIENT_S = 0.2


def unavailable(exc: Exception) -> DatabaseUnavailable | None:
    """The domain error for ``exc`` when it says the database is unreachable or busy, else None."""
    if isinstance(exc, PoolTimeout):
        return DatabaseUnavailable(
            "the database connection pool is exhausted", retry_after_s=RETRY_LOCKED_S
        )
    if not isinstance(exc, (OperationalError, InterfaceError)) and not (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return None
    reason = _first_line(exc)
    if any(word in reason for word in ("locked", "lock timeout", "deadlock")):
        return DatabaseUnavailable(f"the database is busy: {reason}", retry_after_s=RETRY_LOCKED_S)
    return DatabaseUnavailable(f"the database is unreachable: {reason}", retry_after_s=RETRY_DOWN_S)


# PostgreSQL's lock timeout and deadlock (SQLSTATE): rows other transactions hold.
_ROW_BUSY = ("55P03", "40P01")


def _row_busy(exc: BaseException | None) -> bool:
    """Whether ``exc`` is PostgreSQL's lock timeout or a deadlock it broke: a row another
    transaction holds, not a database that is down."""
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in _ROW_BUSY


def row_busy(exc: DatabaseUnavailable) -> bool:
    """Whether the database was unavailable only because of rows another transaction held
    (PostgreSQL's lock timeout, or a deadlock it broke by ending this one)."""
    return _row_busy(exc.__cause__)


def _first_line(exc: Exception) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines() or [type(orig).__name__]
    return lines[0][:300]


class WriteQueue:
    """Admits this process's SQLite writers one at a time, in the order they came.

    SQLite has no queue for its write lock: a writer that finds it taken sleeps in growing
    steps (up to 100 ms) and tries again, so a heartbeat can wait behind every commit of a
    large metrics batch although each commit is short. Writers of this process wait here
    instead, and are woken in arrival order. A thread already inside a write passes through
    (a nested write then meets SQLite's own lock, as before).

    When a writer gives up because another process holds the lock past ``busy_timeout``
    (:meth:`failing_all`), every writer that was already waiting gets the same 503 at once
    instead of waiting out its own ``busy_timeout`` in turn, and writers that come until a
    write succeeds again (at most ``WRITE_TROUBLE_S`` after the last failure) are told to be
    impatient (wait ``IMPATIENT_S`` for the lock).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0  # the ticket the next writer draws
        self._serving = 0  # the ticket allowed in
        self._holder: int | None = None
        # After a writer failed: (tickets drawn by then, when, why); None after a success.
        self._blocked: tuple[int, float, DatabaseUnavailable] | None = None

    @contextmanager
    def failing_all(self) -> Iterator[None]:
        """Inside a turn: when the block raises DatabaseUnavailable, the writers waiting now
        get it too (see the class)."""
        try:
            yield
        except DatabaseUnavailable as exc:
            with self._cond:
                self._blocked = (self._next, time.monotonic(), exc)
            raise
        self._blocked = None

    def waiting(self) -> int:
        """How many writers wait for their turn."""
        with self._cond:
            return self._next - self._serving - (self._holder is not None)

    @contextmanager
    def turn(self) -> Iterator[bool]:
        """Wait for this thread's turn, hold it through the block, then pass it on. Yields
        whether the writer should be impatient (a writer failed on the lock less than
        ``WRITE_TROUBLE_S`` ago and none succeeded since);
        raises DatabaseUnavailable when one failed while this writer waited."""
        me = threading.get_ident()
        if self._holder == me:
            yield False
            return
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()
            blocked = self._blocked
            if blocked is not None and ticket < blocked[0]:
                self._serving += 1
                self._cond.notify_all()
                why = blocked[2]
                raise DatabaseUnavailable(str(why), retry_after_s=why.retry_after_s)
            self._holder = me
        impatient = blocked is not None and time.monotonic() - blocked[1] < WRITE_TROUBLE_S
        try:
            yield impatient
        finally:
            with self._cond:
                self._holder = None
                self._serving += 1
                self._cond.notify_all()


class _WriteSession(Session):
    """The session of :meth:`Transactions.write`: it notes the studies whose ``seq`` it
    changed or which it deleted (``info["studies_changed"]``), for :class:`KnownSeqs`."""


@event.listens_for(_WriteSession, "after_flush")
def _note_changed_studies(session: Session, _context: Any) -> None:
    changed: set[int] = session.info.setdefault("studies_changed", set())
    for obj in session.deleted:
        if isinstance(obj, Study):
            changed.add(obj.id)
    for obj in session.dirty:
        if isinstance(obj, Study) and inspect(obj).attrs.seq.history.has_changes():
            changed.add(obj.id)


class Transactions:
    """Owns the engine and hands out transactions that map database failures. ``seqs``: the
    studies' ``seq`` as last read, forgotten by the writes that change it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seqs = KnownSeqs()
        self._readonly = engine.execution_options(readonly=True)
        self._impatient = engine.execution_options(busy_timeout_s=IMPATIENT_S)
        self._queue = WriteQueue() if engine.dialect.name == "sqlite" else None
        self.health = HealthWindow()
        self._write_trouble: tuple[float, DatabaseUnavailable] | None = None

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @contextmanager
    def write(self, *, lock_timeout_s: float | None = None) -> Iterator[Session]:
        """A read-write transaction, committed when the block ends and rolled back on error.

        Raises DatabaseUnavailable when the database cannot be reached or stays locked.
        On SQLite, this process's writers take their turns in arrival order (WriteQueue).
        ``lock_timeout_s`` (PostgreSQL; ignored on SQLite, whose busy timeout bounds every
        writer already): a statement of this transaction that waits longer for a lock raises
        DatabaseUnavailable ("busy").
        """
        try:
            if self._queue is None:
                with self._tracked(self.engine) as session:
                    if lock_timeout_s is not None:
                        ms = max(1, int(lock_timeout_s * 1000))
                        session.execute(text(f"SET LOCAL lock_timeout = {ms}"))
                    yield session
            else:
                with self._queue.turn() as impatient, self._queue.failing_all():
                    bind = self._impatient if impatient else self.engine
                    with self._tracked(bind) as session:
                        yield session
        except DatabaseUnavailable as exc:
            self._write_trouble = (time.monotonic(), exc)
            raise
        self._write_trouble = None

    @contextmanager
    def _tracked(self, bind: Engine) -> Iterator[Session]:
        """A write transaction whose changed studies' seqs are forgotten as soon as it ends,
        committed or not (a lost commit may have landed), before the next writer's turn."""
        changed: set[int] = set()
        try:
            with self._scope(bind, _WriteSession) as session:
                session.info["studies_changed"] = changed
                yield session
        finally:
            if changed:
                self.seqs.changed(changed)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction that never blocks writers (SQLite: a deferred ``BEGIN``).

        Raises DatabaseUnavailable when the database cannot be reached.
        """
        with self._scope(self._readonly) as session:
            yield session

    def ping(self) -> None:
        """Run ``SELECT 1``. Raises DatabaseUnavailable (with the reason) when that fails."""
        with self.read() as session:
            session.execute(text("SELECT 1"))

    def ping_write(self) -> None:
        """When the last write failed (locked or unreachable database) less than
        ``WRITE_TROUBLE_S`` ago and none succeeded since, try an empty write transaction.
        Raises DatabaseUnavailable (with the reason) when that fails."""
        trouble = self._write_trouble
        if trouble is None or time.monotonic() - trouble[0] > WRITE_TROUBLE_S:
            return
        with self.write() as session:
            session.execute(text("SELECT 1"))

    @contextmanager
    def _scope(self, bind: Engine, kind: type[Session] = Session) -> Iterator[Session]:
        try:
            with kind(bind, expire_on_commit=False) as session, session.begin():
                yield session
        except (DBAPIError, PoolTimeout) as exc:
            mapped = unavailable(exc)
            if mapped is None:
                raise
            if not _row_busy(exc):  # one held row is no outage (leases keep expiring)
                self.health.failed()
            raise mapped from exc
        self.health.succeeded()
