"""Transactions, and the one place where database failures become a domain error.

Every read and write of the core runs inside :meth:`Transactions.write` or
:meth:`Transactions.read`. A failure of the database itself (connection refused or lost, server
down, database dropped, lock timeout, SQLite's "database is locked") leaves that scope as
:class:`~hpo.service.errors.DatabaseUnavailable`, which the API answers with 503 and
``Retry-After``; the transaction is rolled back, so nothing of it was stored. Errors of the
request itself (a unique name taken, a domain error raised inside the scope) pass unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from hpo.service.errors import DatabaseUnavailable

# Seconds a client should wait before retrying: a busy SQLite file frees up quickly, a server
# that is down or restarting takes longer.
RETRY_LOCKED_S = 1
RETRY_DOWN_S = 5


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


def _first_line(exc: Exception) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines() or [type(orig).__name__]
    return lines[0][:300]


class Transactions:
    """Owns the engine and hands out transactions that map database failures."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._readonly = engine.execution_options(readonly=True)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A read-write transaction, committed when the block ends and rolled back on error.

        Raises DatabaseUnavailable when the database cannot be reached or stays locked.
        """
        with self._scope(self.engine) as session:
            yield session

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

    @contextmanager
    def _scope(self, bind: Engine) -> Iterator[Session]:
        try:
            with Session(bind, expire_on_commit=False) as session, session.begin():
                yield session
        except (DBAPIError, PoolTimeout) as exc:
            mapped = unavailable(exc)
            if mapped is None:
                raise
            raise mapped from exc
