"""The Alembic migrations build exactly the schema the models declare, on both databases."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from hpo.service.db import make_engine, upgrade_schema
from hpo.service.db.models import Base


def _differences(engine: Engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def _migrate(engine: Engine, revision: str, *, down: bool = False) -> None:
    """Run the migrations of ``engine``'s database up (or ``down``) to ``revision``."""
    from hpo.service.db.engine import migrate

    migrate(engine, revision, down=down)


def _at_revision(engine: Engine, revision: str) -> None:
    """Migrate the empty database of ``engine`` up to ``revision`` (an old server's schema),
    with study 1 and its trial 1 in it."""
    from sqlalchemy import text

    _migrate(engine, revision)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO studies (id, name, spec, state, next_number, seq, created_at,"
                " updated_at) VALUES (1, 's', '{}', 'running', 1, 1, :t, :t)"
            ),
            {"t": "2026-01-01 00:00:00"},
        )
        conn.execute(
            text(
                "INSERT INTO trials (id, study_id, number, state, attempts, seq, created_at)"
                " VALUES (1, 1, 0, 'running', 1, 1, :t)"
            ),
            {"t": "2026-01-01 00:00:00"},
        )


def test_migrations_match_the_models(db_url: str) -> None:
    """Every migration from an empty database (what an old database goes through)."""
    from alembic import command

    from hpo.service.db.engine import alembic_config

    engine = make_engine(db_url)
    try:
        cfg = alembic_config(engine)
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()
        upgrade_schema(engine)  # idempotent: a second start changes nothing
        assert _differences(engine) == []
    finally:
        engine.dispose()


def test_a_url_with_escapes_migrates(db_url: str) -> None:
    """A URL holding "%" escapes (PostgreSQL options with an encoded "=", a file name with a
    percent sign) reaches Alembic intact: its config would read "%" as an interpolation."""
    from hpo.service.db.engine import alembic_config

    if db_url.startswith("sqlite"):
        url = db_url.replace("hpo.db", "100%25 hpo.db")
    else:
        url = db_url + "?options=-c%20statement_timeout%3D60000"
    engine = make_engine(url)
    try:
        upgrade_schema(engine)
        assert _differences(engine) == []
        rendered = engine.url.render_as_string(hide_password=False)
        assert alembic_config(engine).get_main_option("sqlalchemy.url") == rendered
    finally:
        engine.dispose()


def test_a_fresh_database_gets_the_models_schema_at_the_newest_revision(db_url: str) -> None:
    """The first start creates the tables in one step and stamps the newest revision, so the
    next migration applies to it as to a migrated database."""
    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    from hpo.service.db.engine import alembic_config

    engine = make_engine(db_url)
    try:
        upgrade_schema(engine)
        upgrade_schema(engine)
        assert _differences(engine) == []
        head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
        with engine.connect() as conn:
            stamped = conn.execute(text("SELECT version_num FROM alembic_version")).scalars()
            assert list(stamped) == [head]
    finally:
        engine.dispose()


def test_upgrading_a_0002_database_keeps_one_copy_of_each_resent_point(db_url: str) -> None:
    from sqlalchemy import text

    engine = make_engine(db_url)
    try:
        _at_revision(engine, "0002")
        with engine.begin() as conn:
            for step, value in [(1, 0.5), (1, 0.5), (2, 0.25)]:  # step 1 sent twice
                conn.execute(
                    text(
                        "INSERT INTO metric_points (trial_id, study_id, step, name, value, time)"
                        " VALUES (1, 1, :s, 'loss', :v, :t)"
                    ),
                    {"s": step, "v": value, "t": "2026-01-01 00:00:00"},
                )
        upgrade_schema(engine)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT step, attempt FROM metric_points ORDER BY step")).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [(1, 1), (2, 1)]


def test_upgrading_to_0013_drops_only_the_points_study_keys_and_keeps_their_ids(
    db_url: str,
) -> None:
    """0013 takes the foreign keys to ``studies`` off ``metric_points`` and ``trial_curves``
    (SQLite: by rebuilding both, after deleting rows of no trial, which would fail the copy's
    foreign-key check). The rows stay, with their ids; a point stored after the
    upgrade gets an id past every id handed out before, deleted ones included (SQLite's
    AUTOINCREMENT counter survives the rebuild); deleting the study still deletes its points
    and curves, through its trials."""
    from sqlalchemy import inspect, text

    at = {"t": "2026-01-01 00:00:00"}
    engine = make_engine(db_url)
    try:
        _at_revision(engine, "0012")
        with engine.begin() as conn:
            for step in (1, 2, 3):
                conn.execute(
                    text(
                        "INSERT INTO metric_points (trial_id, study_id, step, name, value, time)"
                        " VALUES (1, 1, :s, 'loss', 0.5, :t)"
                    ),
                    {"s": step, **at},
                )
            conn.execute(
                text(
                    "INSERT INTO trial_curves (trial_id, name, study_id, shift, n, buckets)"
                    " VALUES (1, 'loss', 1, 0, 3, '[]')"
                )
            )
            ids = list(conn.execute(text("SELECT id FROM metric_points ORDER BY id")).scalars())
            conn.execute(text("DELETE FROM metric_points WHERE step = 3"))
        if engine.dialect.name == "sqlite":  # a point of no trial, written with the keys off
            with sqlite3.connect(engine.url.database) as raw:
                raw.execute(
                    "INSERT INTO metric_points (id, trial_id, study_id, step, name, value, time)"
                    " VALUES (100, 99, 1, 1, 'loss', 0.5, '2026-01-01 00:00:00')"
                )
            ids.append(100)
        _migrate(engine, "0014")
        for table in ("metric_points", "trial_curves"):
            keys = inspect(engine).get_foreign_keys(table)
            assert [(k["referred_table"], k["constrained_columns"]) for k in keys] == [
                ("trials", ["trial_id"])
            ], table
        with engine.begin() as conn:
            assert (
                list(conn.execute(text("SELECT id FROM metric_points ORDER BY id")).scalars())
                == ids[:2]
            )
            new = conn.execute(
                text(
                    "INSERT INTO metric_points (trial_id, study_id, step, name, value, time,"
                    " attempt) VALUES (1, 1, 4, 'loss', 0.5, :t, 1) RETURNING id"
                ),
                at,
            ).scalar_one()
            assert new > ids[-1]  # not the deleted point's id again
            conn.execute(text("DELETE FROM studies WHERE id = 1"))
            left = [
                conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                for table in ("metric_points", "trial_curves")
            ]
    finally:
        engine.dispose()
    assert left == [0, 0]


def test_upgrading_to_0015_drops_the_points_trial_key_and_a_deleted_study_leaves_no_point(
    db_url: str,
) -> None:
    """0015 takes the trial's foreign key off ``metric_points`` (SQLite: by rebuilding the
    table); the curves keep theirs. The points stay with their ids, SQLite's AUTOINCREMENT
    counter survives, and deleting a study deletes its points, now by study and no longer
    through the key's cascade, and only its own. Down again, the key comes back, after the
    points of no trial are deleted (the key's check would refuse them)."""
    from sqlalchemy import inspect, text

    from hpo.service.storage import studies

    at = {"t": "2026-01-01 00:00:00"}
    insert = text(
        "INSERT INTO metric_points (trial_id, study_id, step, name, value, time, attempt)"
        " VALUES (:trial, :study, :s, 'loss', 0.5, :t, 1)"
    )
    engine = make_engine(db_url)
    try:
        _at_revision(engine, "0014")
        with engine.begin() as conn:  # study 2 with trial 2: what the delete must leave
            conn.execute(
                text(
                    "INSERT INTO studies (id, name, spec, state, next_number, seq, created_at,"
                    " updated_at) VALUES (2, 's2', '{}', 'running', 1, 1, :t, :t)"
                ),
                at,
            )
            conn.execute(
                text(
                    "INSERT INTO trials (id, study_id, number, state, attempts, seq, created_at)"
                    " VALUES (2, 2, 0, 'running', 1, 1, :t)"
                ),
                at,
            )
            for trial, step in ((1, 1), (1, 2), (2, 1), (1, 3)):
                conn.execute(insert, {"trial": trial, "study": trial, "s": step, **at})
            ids = list(conn.execute(text("SELECT id FROM metric_points ORDER BY id")).scalars())
            conn.execute(text("DELETE FROM metric_points WHERE step = 3"))
        _migrate(engine, "head")
        assert _differences(engine) == []
        keys = {t: inspect(engine).get_foreign_keys(t) for t in ("metric_points", "trial_curves")}
        assert keys["metric_points"] == []
        assert [
            (k["referred_table"], k["options"].get("ondelete")) for k in keys["trial_curves"]
        ] == [("trials", "CASCADE")]
        with engine.begin() as conn:
            assert (
                list(conn.execute(text("SELECT id FROM metric_points ORDER BY id")).scalars())
                == ids[:3]
            )
            new = conn.execute(
                text(insert.text + " RETURNING id"), {"trial": 1, "study": 1, "s": 4, **at}
            ).scalar_one()
            assert new > ids[-1]  # not the deleted point's id again
            # a point of no trial (only SQL written by hand could leave one): now stored
            conn.execute(insert, {"trial": 99, "study": 2, "s": 1, **at})
        with Session(engine) as s, s.begin():
            studies.delete(s, studies.get(s, 1, lock=True))
        with engine.connect() as conn:
            left = list(
                conn.execute(text("SELECT trial_id FROM metric_points ORDER BY id")).scalars()
            )
        assert left == [2, 99]  # study 2's, and nothing of study 1
        _migrate(engine, "0014", down=True)
        with engine.begin() as conn:
            left = list(conn.execute(text("SELECT trial_id FROM metric_points")).scalars())
            newer = conn.execute(
                text(insert.text + " RETURNING id"), {"trial": 2, "study": 2, "s": 2, **at}
            ).scalar_one()
        assert left == [2]
        assert newer > new + 1  # not the id of the point of no trial again
        keys = inspect(engine).get_foreign_keys("metric_points")
        assert [(k["referred_table"], k["options"].get("ondelete")) for k in keys] == [
            ("trials", "CASCADE")
        ]
    finally:
        engine.dispose()


def test_a_rollback_to_an_old_schema_and_back_keeps_every_row(db_url: str) -> None:
    """Down to 0005 (an old hpo's schema: every migration that drops a column of ``trials``
    or ``studies`` runs down) and up again: no study, trial, event, parameter or point is
    lost on the way, and SQLite's ``trials`` and ``studies`` keep AUTOINCREMENT (deleted ids
    never come back). On SQLite a copied table used to take every row referencing it with
    it: the trials' children at 0010, every trial at 0005."""
    from sqlalchemy import text

    from hpo.service.records import MetricInput
    from hpo.service.spec import StudySpec
    from hpo.service.storage import Storage
    from hpo.service.studies import StudyService
    from tests.conftest import simple_spec

    tables = ("studies", "trials", "trial_events", "trial_params", "metric_points")

    def counts() -> dict[str, int]:
        with engine.connect() as conn:
            return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in tables}

    engine = make_engine(db_url)
    try:
        upgrade_schema(engine)
        service = StudyService(Storage(engine))
        for name in ("a", "b"):
            study_id = service.create_study(StudySpec.model_validate(simple_spec(name))).id
            for i in range(3):
                trial = service.ask(study_id)
                service.report(
                    trial.id, [MetricInput(step, "loss", 1.0 / (step + 1)) for step in range(4)]
                )
                if i:
                    service.tell(trial.id, value=float(i))
        before = counts()
        assert min(before.values()) > 0, before
        _migrate(engine, "0005", down=True)
        assert counts() == before
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                ddl = dict(conn.execute(text("SELECT name, sql FROM sqlite_master")).all())
            assert "AUTOINCREMENT" in ddl["trials"] and "AUTOINCREMENT" in ddl["studies"]
        _migrate(engine, "head")
        assert counts() == before
        assert _differences(engine) == []
    finally:
        engine.dispose()


def test_a_rollback_below_0005_with_a_long_note_stored(db_url: str) -> None:
    """0005 widened ``meta.value`` for the preflight report; its downgrade narrowed the
    column again, which PostgreSQL refused while such a report (past 256 characters) was
    stored: the documented rollback failed. The long notes (rewritten by the server) go."""
    from sqlalchemy import text

    from hpo.service.storage import Storage, meta

    engine = make_engine(db_url)
    try:
        upgrade_schema(engine)
        storage = Storage(engine)
        meta.put(storage, "preflight", "x" * 5000)
        meta.put(storage, "short", "kept")
        _migrate(engine, "0004", down=True)
        with engine.connect() as conn:
            rows = dict(conn.execute(text("SELECT key, value FROM meta")).all())
        assert "preflight" not in rows and rows["short"] == "kept"
        _migrate(engine, "head")
        assert _differences(engine) == []
    finally:
        engine.dispose()


def test_another_programs_alembic_version_is_named_as_such(tmp_path: Path) -> None:
    """A database holding only another Alembic-managed program's tables was blamed on "a
    newer hpo"."""
    from hpo.service.db.engine import schema_problem

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('a1b2c3d4e5f6')")
    engine = make_engine(f"sqlite:///{path}")
    try:
        problem = schema_problem(engine)
    finally:
        engine.dispose()
    assert problem is not None and "belongs to another program" in problem


def test_rows_another_tool_left_referencing_none_do_not_stop_a_start(tmp_path: Path) -> None:
    """The sqlite3 shell writes with foreign keys off: a trial deleted there leaves its events
    behind. The migrations refuse only rows referencing none that they made themselves: a
    start at the newest schema, and one that migrates, both go on."""
    from sqlalchemy import text

    from hpo.service.spec import StudySpec
    from hpo.service.storage import Storage
    from hpo.service.studies import StudyService
    from tests.conftest import simple_spec

    path = tmp_path / "hpo.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        upgrade_schema(engine)
        service = StudyService(Storage(engine))
        study_id = service.create_study(StudySpec.model_validate(simple_spec("left"))).id
        trial = service.ask(study_id)
        _migrate(engine, "0015", down=True)
        with sqlite3.connect(path) as raw:  # foreign keys off, as the shell has them
            raw.execute("DELETE FROM trials WHERE id = ?", (trial.id,))
        upgrade_schema(engine)  # migrates to the newest schema
        upgrade_schema(engine)  # and starts at it
        with engine.connect() as conn:
            left = conn.execute(text("SELECT count(*) FROM trial_events")).scalar_one()
        assert left == 1  # still there: not the migrations' to delete
    finally:
        engine.dispose()


def test_a_database_keeps_the_deployment_id_made_at_its_first_start(
    db_url: str, tmp_path: Path
) -> None:
    from hpo.service.storage import Storage, meta

    def started(url: str) -> str:  # one server start: migrate, then read (or make) the id
        engine = make_engine(url)
        try:
            upgrade_schema(engine)
            return meta.deployment_id(Storage(engine))
        finally:
            engine.dispose()

    first = started(db_url)
    assert len(first) == 12
    assert started(db_url) == first  # a restart keeps it
    assert started(f"sqlite:///{tmp_path / 'other.db'}") != first  # another database: another id


# One server start's migration in its own process: it says it is ready once everything it
# imports and reads before touching the database is loaded (the revision scripts included),
# and waits for the go, so that several processes really start migrating together.
_STARTER = """
import sys, time
from pathlib import Path
from alembic import command
from alembic.script import ScriptDirectory
from hpo.service.db import make_engine, upgrade_schema
from hpo.service.db.engine import alembic_config
engine = make_engine(sys.argv[1])
ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
Path(sys.argv[2] + ".ready").touch()
while not Path(sys.argv[2] + ".go").exists():
    time.sleep(0.005)
upgrade_schema(engine)
"""


@pytest.mark.parametrize("start_from", [None, "0005"])
def test_servers_starting_at_once_migrate_the_database_once(
    db_url: str, start_from: str | None, tmp_path: Path
) -> None:
    """Four server processes start migrating at the same moment on one database, fresh or at
    an old revision (a rolling upgrade): each start succeeds and the schema ends at the newest
    revision (the migrations run under one lock, not side by side)."""
    from alembic import command
    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    from hpo.service.db.engine import alembic_config

    engine = make_engine(db_url)
    try:
        cfg = alembic_config(engine)
        if start_from is not None:
            with engine.connect() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, start_from)
                conn.commit()
        starters = [
            subprocess.Popen(
                [sys.executable, "-c", _STARTER, db_url, str(tmp_path / f"starter-{i}")],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(4)
        ]
        try:
            deadline = time.monotonic() + 120
            while len(list(tmp_path.glob("starter-*.ready"))) < len(starters):
                assert time.monotonic() < deadline and all(p.poll() is None for p in starters)
                time.sleep(0.01)
            for i in range(len(starters)):
                (tmp_path / f"starter-{i}.go").touch()
            outcomes = [(p.communicate(timeout=120)[0], p.returncode) for p in starters]
        finally:
            for p in starters:
                p.kill()
        assert all(code == 0 for _, code in outcomes), outcomes
        assert _differences(engine) == []
        head = ScriptDirectory.from_config(cfg).get_current_head()
        with engine.connect() as conn:
            stamped = conn.execute(text("SELECT version_num FROM alembic_version")).scalars()
            assert list(stamped) == [head]
    finally:
        engine.dispose()


def test_a_start_checks_a_database_it_cannot_write_and_waits_little_for_a_busy_one(
    tmp_path: Path,
) -> None:
    """``hpo serve``'s checks before it serves: a read-only database is a problem (it served,
    then every write failed as "unreachable"); one whose write lock another process holds is
    not (it serves once the lock is free), and the checks wait at most half a second on it
    (both waited on SQLite's lock, 3 s, and a locked database refused the start)."""
    from hpo.service.db.engine import schema_problem, write_problem

    path = tmp_path / "hpo.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade_schema(engine)
    assert write_problem(engine) is None and schema_problem(engine) is None
    read_only = make_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    assert "attempt to write a readonly database" in (write_problem(read_only) or "")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another server mid-write
    try:
        started = time.monotonic()
        assert write_problem(engine) is None and schema_problem(engine) is None
        assert time.monotonic() - started < 2.0
    finally:
        other.execute("ROLLBACK")
        other.close()
