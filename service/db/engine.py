"""Engines for SQLite (WAL, serialized writes) and PostgreSQL, and schema upgrades."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import asbool

from hpo.service.db import jsontext

MIGRATIONS = Path(__file__).with_name("migrations")

# How long a SQLite writer waits for a write lock that another process holds before the
# request answers 503 (with Retry-After). This process's own writers queue in WriteQueue and
# never wait here for each other; another ``hpo serve`` on the same file holds the lock only
# for one short transaction at a time.
SQLITE_BUSY_TIMEOUT_S = 3.0


def normalize_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` URLs and use the psycopg 3 driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def in_memory(url: str) -> bool:
    """Whether ``url`` is a SQLite database in this process's memory (``sqlite://``,
    ``:memory:``, or a URI: ``file::memory:?…&uri=true``, ``file:name?mode=memory&uri=true``):
    no other process can open it."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return False
    if parsed.database in (None, "", ":memory:"):
        return True

    def values(name: str) -> tuple[str, ...]:
        value = parsed.query.get(name, ())
        return value if isinstance(value, tuple) else (value,)

    if not any(asbool(v) for v in values("uri")):  # not a URI: a file of that name
        return False
    return parsed.database == "file::memory:" or "memory" in values("mode")


def make_engine(url: str, *, echo: bool = False, pool_size: int = 10) -> Engine:
    """Create an engine; on SQLite, enable WAL and make every write transaction exclusive.
    ``pool_size``: PostgreSQL connections kept open (twice as many more at a burst).

    SQLite allows one writer at a time; ``BEGIN IMMEDIATE`` takes the write lock when the
    transaction starts, so read-modify-write sequences (ask, tell) are serialized across threads
    and processes instead of failing at commit. Read-only sessions (``readonly`` execution
    option) start a plain deferred transaction and run beside the writer under WAL.
    """
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        # A URI's database in memory (``file::memory:``, ``mode=memory``; shared by its
        # connections with ``cache=shared``) gets the pool of a file: SQLAlchemy 2.1 picks a
        # SingletonThreadPool for ``mode=memory`` (deprecated, and it closes a sixth thread's
        # connection under another) and QueuePool for the rest. ``:memory:`` keeps its own.
        uri = in_memory(url) and make_url(url).database not in (None, "", ":memory:")
        pool = {"poolclass": QueuePool} if uri else {}
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
            json_deserializer=jsontext.loads,
            **pool,
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(
        url,
        echo=echo,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=2 * pool_size,
        json_deserializer=jsontext.loads,
    )


def _configure_sqlite(engine: Engine) -> None:
    busy_ms_default = int(SQLITE_BUSY_TIMEOUT_S * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        if not in_memory(str(engine.url)):
            _set_wal(cur)
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={busy_ms_default}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        options = conn.get_execution_options()
        if options.get("readonly", False):
            conn.exec_driver_sql("BEGIN")
            return
        # A writer may ask to wait less for the lock (``busy_timeout_s`` execution option).
        busy_ms = int(options.get("busy_timeout_s", SQLITE_BUSY_TIMEOUT_S) * 1000)
        if conn.info.get("busy_ms", busy_ms_default) != busy_ms:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={busy_ms}")
        conn.info["busy_ms"] = busy_ms
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _set_wal(cursor: Any, wait_s: float = SQLITE_BUSY_TIMEOUT_S) -> None:
    """Put the database in WAL mode, waiting up to ``wait_s`` while another connection holds
    it: SQLite answers "database is locked" at once here, without its busy handler, when
    processes open a new file together (servers starting at once)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def alembic_config(engine: Engine):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    # The config is a ConfigParser: "%" (a URL's escapes, such as PostgreSQL options'
    # "statement_timeout%3D60000", or a folder named with one) starts an interpolation unless
    # doubled.
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    url = engine.url.render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


# How long a starting server waits for another one's migrations (SQLite's lock).
SCHEMA_WAIT_S = 300.0

# Held while a PostgreSQL database's schema is made or migrated, so that servers starting on
# it at once change it one at a time (any constant; hpo's own).
_SCHEMA_LOCK = 0x6870_6F01


def write_problem(engine: Engine) -> str | None:
    """Why the server could not write to this database (a read-only file, a read-only
    PostgreSQL standby or role), or None: a write that changes nothing, rolled back. A
    database without hpo's tables yet is written by :func:`upgrade_schema` at once."""
    from sqlalchemy.exc import DBAPIError

    try:
        # an UPDATE of no row of a table the server writes: refused by a read-only database
        # or role as a real one is, and waits little behind another writer (which is no
        # problem: the server waits for it as any writer does)
        with engine.connect().execution_options(busy_timeout_s=0.5) as conn, conn.begin() as tx:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL lock_timeout = '2s'"))
            conn.execute(text("UPDATE studies SET name = name WHERE 1 = 0"))
            tx.rollback()
    except DBAPIError as exc:  # also: no such table yet (a fresh database), locked, busy
        sqlite_code = getattr(exc.orig, "sqlite_errorcode", None)
        state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        # read-only (SQLITE_READONLY and its extended codes; a read-only transaction, no
        # privilege): not a database busy or locked by another writer, which serves anyway
        if (sqlite_code is not None and sqlite_code & 0xFF == 8) or state in ("25006", "42501"):
            return f"it cannot be written: {str(exc.orig).strip().splitlines()[0]}"
    return None


def schema_problem(engine: Engine) -> str | None:
    """Why :func:`upgrade_schema` cannot bring this database to the newest schema, or None:
    it was written by a newer hpo (a schema revision this one does not know), or it holds
    tables named as hpo's but no hpo schema revision (another program's)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    # read-only on SQLite: a plain BEGIN, which another process's write lock does not hold up
    with engine.connect().execution_options(readonly=True) as conn:
        tables = set(inspect(conn).get_table_names())
        if not tables:
            return None  # a fresh database
        current = MigrationContext.configure(conn).get_current_revision()
    if current is None:
        from hpo.service.db.models import Base

        clash = sorted(tables & set(Base.metadata.tables))
        if not clash:
            return None  # other programs' tables only: hpo's are made beside them
        named = ", ".join(clash[:5]) + (", ..." if len(clash) > 5 else "")
        return (
            f"it holds tables named as hpo's ({named}) but no hpo schema revision: not an hpo "
            "database; give hpo an empty database, or a file or schema of its own"
        )
    scripts = ScriptDirectory.from_config(alembic_config(engine))
    try:
        scripts.get_revision(current)
    except Exception:  # alembic's "Can't locate revision"
        from hpo.service.db.models import Base

        if not tables & set(Base.metadata.tables):  # another Alembic-managed program's
            return (
                f"its alembic_version ({current}) belongs to another program: none of hpo's "
                "tables is there; give hpo an empty database, or a schema of its own "
                "(PostgreSQL: ?options=-csearch_path%3Dhpo in the URL)"
            )
        return (
            f"it is at schema revision {current}, which this hpo does not know (its newest is "
            f"{scripts.get_current_head()}): a newer hpo wrote it; run that version, or upgrade "
            "hpo"
        )
    return None


def upgrade_schema(engine: Engine) -> None:
    """Bring the database to the newest schema (idempotent; safe on every start).

    A fresh database (no table at all) gets the models' tables at once and is stamped with
    the newest revision: the same schema as running every migration
    (``tests/service/test_migrations.py`` compares both with the models), in one step instead
    of ten. A database with tables is migrated from its revision. Either is one transaction,
    and servers that start together take turns: the later ones find the work done
    (PostgreSQL: an advisory lock; SQLite: the transaction is BEGIN IMMEDIATE, and a starter
    waits up to SCHEMA_WAIT_S for another's migrations)."""
    from alembic import command

    from hpo.service.db.models import Base

    cfg = alembic_config(engine)
    with engine.connect() as conn, _foreign_keys_deferred(conn):
        cfg.attributes["connection"] = conn
        conn.execution_options(busy_timeout_s=SCHEMA_WAIT_S)  # SQLite's wait for the lock
        with conn.begin():  # alembic runs in it (an external transaction: no commit of its own)
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
            if inspect(conn).get_table_names():
                if _revision(conn) != _head(cfg):
                    broken = _broken_references(conn)
                    command.upgrade(cfg, "head")
                    _check_references(conn, broken)
            else:
                Base.metadata.create_all(conn)
                command.stamp(cfg, "head")


def migrate(engine: Engine, revision: str, *, down: bool = False) -> None:
    """Run the migrations of ``engine``'s database up (or ``down``) to ``revision`` in one
    transaction, as :func:`upgrade_schema` runs them (a rollback to an older hpo's schema
    is a migration down to its revision)."""
    from alembic import command

    cfg = alembic_config(engine)
    with engine.connect() as conn, _foreign_keys_deferred(conn):
        cfg.attributes["connection"] = conn
        with conn.begin():
            broken = _broken_references(conn)
            (command.downgrade if down else command.upgrade)(cfg, revision)
            _check_references(conn, broken)


def _revision(conn: Connection) -> str | None:
    from alembic.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _head(cfg: Any) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(cfg).get_current_head()


@contextmanager
def _foreign_keys_deferred(conn: Connection) -> Iterator[None]:
    """SQLite: no foreign key enforced while migrations run on ``conn`` (set before its
    transaction begins: SQLite ignores the pragma inside one), as Alembic advises for its
    batch mode. A table that batch mode copies is dropped and made again, and under foreign
    keys that drop deletes every row referencing it (``ON DELETE CASCADE``): copying
    ``trials`` emptied the trials' events, parameters and points, and copying ``studies``
    every trial. :func:`_check_references` checks them once, before the commit."""
    if conn.dialect.name != "sqlite":
        yield
        return
    raw = conn.connection.driver_connection
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        with suppress(sqlite3.Error):  # a connection that broke is discarded anyway
            raw.execute("PRAGMA foreign_keys=ON")


def _broken_references(conn: Connection) -> Counter[tuple[str, str]]:
    """SQLite: how many rows reference none (``PRAGMA foreign_key_check``), by table and the
    table they name: a tool that wrote with foreign keys off may have left some, which is no
    reason to refuse a migration. (Counted, not listed by rowid: a table copied by a
    migration may number its rows anew.)"""
    if conn.dialect.name != "sqlite":
        return Counter()
    rows = conn.exec_driver_sql("PRAGMA foreign_key_check")
    return Counter((str(table), str(parent)) for table, _rowid, parent, _key in rows)


def _check_references(conn: Connection, before: Counter[tuple[str, str]]) -> None:
    """SQLite: refuse (roll back) a migration that left more rows referencing none than
    there were ``before`` it."""
    new = _broken_references(conn) - before
    if new:
        raise RuntimeError(f"the migration left rows referencing none: {dict(new)}")
