"""``hpo doctor`` checks that need no cluster: a database behind the newest schema, where the
Ray token is looked for (as Ray 2.60's loader does), and a server that answers healthy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text

from hpo.api.doctor import ray_token, run_checks
from hpo.service.db import make_engine, upgrade_schema
from hpo.service.db.engine import alembic_config, schema_problem
from hpo.service.settings import Settings
from tests.conftest import ServerProcess


def test_a_database_behind_the_newest_schema_fails(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    with engine.connect() as conn:
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    engine.dispose()
    checks = run_checks(Settings(data_dir=tmp_path, database_url=url), timeout_s=2)
    (database,) = [c for c in checks if c.name == "database"]
    assert not database.ok
    assert "at schema revision 0004" in database.message and "hpo serve" in database.message
    missing = run_checks(Settings(data_dir=tmp_path / "none"), timeout_s=2)[0]
    assert not missing.ok and "does not exist" in missing.message


def test_the_ray_token_is_looked_for_where_ray_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    found, why = ray_token()
    assert not found and "~/.ray/auth_token" in why and "RAY_AUTH_TOKEN" in why
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret\n")
    assert ray_token() == (True, str(tmp_path / ".ray" / "auth_token"))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    found, why = ray_token()  # a path that is named but missing wins over the default file
    assert not found and str(tmp_path / "missing") in why
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    assert ray_token() == (True, "RAY_AUTH_TOKEN")


def test_a_healthy_local_server_passes_every_check(sqlite_server: ServerProcess) -> None:
    settings = Settings(
        data_dir=sqlite_server.data_dir,
        database_url=sqlite_server.database_url,
        public_url=sqlite_server.url,
    )
    checks = run_checks(settings, sqlite_server.url, timeout_s=10)
    assert [c.line() for c in checks if not c.ok] == []
    assert {c.name for c in checks} == {
        "database",
        "settings",
        "ray",
        "storage",
        "public-url",
        "server",
    }
    # without HPO_PUBLIC_URL, the server --url names is where its workers post (it was
    # HPO_PORT's default, 8000, whatever --url said)
    local = Settings(data_dir=sqlite_server.data_dir, database_url=sqlite_server.database_url)
    checks = run_checks(local, sqlite_server.url, timeout_s=10)
    (public,) = [c for c in checks if c.name == "public-url"]
    assert public.ok and sqlite_server.url in public.message, public.message


def test_hpo_doctor_checks_the_server_hpo_url_names(sqlite_server: ServerProcess) -> None:
    """As every other command, ``hpo doctor`` finds the server through $HPO_URL (it checked
    HPO_PORT's 8000 and failed for a server elsewhere)."""
    env = {
        **os.environ,
        "HPO_URL": sqlite_server.url,
        "HPO_DATABASE_URL": sqlite_server.database_url,
        "HPO_DATA_DIR": str(sqlite_server.data_dir),
        "COLUMNS": "300",
    }
    env.pop("HPO_PUBLIC_URL", None)
    r = subprocess.run(
        [sys.executable, "-m", "hpo.api.cli", "doctor", "--timeout", "10"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ok    public-url: the control plane answers at {sqlite_server.url}" in r.stdout
    assert "ok    server:" in r.stdout, r.stdout


def _newer_and_foreign(tmp_path: Path) -> tuple[str, str]:
    """A database a newer hpo wrote (a revision this one does not know), and one of
    another program's (tables, no hpo revision)."""
    newer, foreign = f"sqlite:///{tmp_path / 'newer.db'}", f"sqlite:///{tmp_path / 'other.db'}"
    engine = make_engine(newer)
    upgrade_schema(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    engine = make_engine(foreign)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE studies (id INTEGER PRIMARY KEY, what TEXT)"))
    engine.dispose()
    return newer, foreign


def test_a_database_of_a_newer_hpo_or_of_another_program_is_named_so(tmp_path: Path) -> None:
    newer, foreign = _newer_and_foreign(tmp_path)
    checks = run_checks(Settings(data_dir=tmp_path, database_url=newer), timeout_s=2)
    (database,) = [c for c in checks if c.name == "database"]
    assert not database.ok and "a newer hpo wrote it" in database.message, database.message
    assert "start `hpo serve`" not in database.message  # that would fail the same way
    beside = make_engine(f"sqlite:///{tmp_path / 'beside.db'}")  # other tables, none of hpo's
    with beside.begin() as conn:
        conn.execute(text("CREATE TABLE foo (id INTEGER PRIMARY KEY)"))
    assert schema_problem(beside) is None
    upgrade_schema(beside)  # hpo's tables are made beside it
    beside.dispose()
    for url, says in ((newer, "schema revision 9999"), (foreign, "not an hpo database")):
        result = subprocess.run(
            [sys.executable, "-m", "hpo.api.cli", "serve", "--database-url", url, "--port", "1"],
            env={**os.environ, "HPO_DATA_DIR": str(tmp_path / "data")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert says in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "hpo serving on" not in result.stdout + result.stderr
