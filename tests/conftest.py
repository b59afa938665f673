"""Fixtures that start the real parts: SQLite files, fresh PostgreSQL databases, and
``hpo serve`` in a subprocess answering over HTTP on a free port."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from hpo.api.client import Client
from hpo.api.demo import free_port
from hpo.service.db import make_engine, upgrade_schema
from hpo.service.settings import new_token
from hpo.service.storage import Storage
from hpo.service.studies import StudyService

PG_ADMIN_URL = os.environ.get(
    "HPO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_POSTGRES = os.environ.get("HPO_REQUIRE_POSTGRES") == "1"


def _pg_reachable() -> bool:
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def pg_available() -> bool:
    ok = _pg_reachable()
    if not ok and REQUIRE_POSTGRES:
        pytest.fail(f"PostgreSQL is required (HPO_REQUIRE_POSTGRES=1) but {PG_ADMIN_URL} is down")
    return ok


def create_pg_database() -> str:
    """A fresh, empty PostgreSQL database; returns its URL."""
    import psycopg

    name = f"hpo_test_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


def drop_pg_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, pg_available: bool) -> Iterator[str]:
    """A fresh database: a SQLite file, or a new PostgreSQL database on the local server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hpo.db'}"
        return
    if not pg_available:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}")
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def storage(db_url: str) -> Iterator[Storage]:
    """The core's storage over a fresh, migrated database (SQLite and PostgreSQL)."""
    engine = make_engine(db_url)
    upgrade_schema(engine)
    yield Storage(engine)
    engine.dispose()


@pytest.fixture
def service(storage: Storage) -> StudyService:
    """The study service over ``storage``."""
    return StudyService(storage)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hpo.db'}"


class ServerProcess:
    """``hpo serve`` in a subprocess. ``restart()`` kills it and starts it on the same port."""

    def __init__(
        self,
        database_url: str,
        data_dir: Path,
        extra_env: dict[str, str],
        args: Sequence[str] = (),
    ) -> None:
        self.args = list(args)  # more options of ``hpo serve``
        self.database_url = database_url
        self.data_dir = data_dir
        self.port = free_port()
        self.token = new_token()  # never starts with '-': tests pass it as ``--token X``
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = extra_env
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir / "serve.log"

    def start(self, *, healthy: bool = True) -> None:
        """Start it and wait until ``/healthz`` answers 200 (with ``healthy=False``: until it
        answers at all, for a server whose health check is meant to fail)."""
        env = {
            **os.environ,
            "HPO_DATABASE_URL": self.database_url,
            "HPO_DATA_DIR": str(self.data_dir),
            "HPO_TOKEN": self.token,
            "HPO_LEASE_SWEEP_INTERVAL_S": "0.5",
            **self.extra_env,
        }
        log = open(self.log_path, "a")  # noqa: SIM115 - lives as long as the process
        # Its own session: killing the group also kills a local Ray it started.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hpo.api.cli", "serve", "--port", str(self.port), *self.args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("hpo serve exited:\n" + self.log_path.read_text()[-4000:])
            try:
                status = httpx.get(self.url + "/healthz", timeout=2).status_code
                if status == 200 or (not healthy and status == 503):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("hpo serve did not come up:\n" + self.log_path.read_text()[-4000:])

    def kill(self) -> None:
        """SIGKILL the server and everything it started (a crash of the control plane)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        self.kill()  # whatever is left of the group (Ray agents)

    def restart(self) -> None:
        self.kill()
        self.start()

    def __enter__(self) -> ServerProcess:
        """``with ServerProcess(...) as proc:``: started, and stopped when the block ends."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, self.token if token is None else token)

    def http(self, token: str | None = None) -> httpx.Client:
        """A raw HTTP client (for asserting status codes and bodies)."""
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A served control plane (ask/tell only, no scheduler) on SQLite or PostgreSQL."""
    with ServerProcess(db_url, tmp_path, {"HPO_SCHEDULER": "false"}) as proc:
        yield proc


@pytest.fixture
def sqlite_server(sqlite_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(sqlite_url, tmp_path, {"HPO_SCHEDULER": "false"}) as proc:
        yield proc


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str) -> ModuleType:
    """``examples/<name>.py`` loaded as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"hpo_example_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def simple_spec(name: str = "s", **overrides: object) -> dict:
    spec: dict = {
        "name": name,
        "objective": {"metric": "loss", "direction": "minimize"},
        "sampler": {"type": "random", "seed": 0},
        "space": {
            "x": {"type": "float", "low": -5.0, "high": 5.0},
            "n": {"type": "int", "low": 1, "high": 4},
        },
    }
    spec.update(overrides)
    return spec


def failed_attempts(trial: Any) -> tuple[list[str], list[str]]:
    """The details of the trial's failed attempts, and of those among them charged to
    ``max_retries`` (not lost to the infrastructure, which is retried for free: CI saw Ray's
    own dispatcher actor crash under an attempt)."""
    failures = [e.detail or "" for e in trial.events or [] if e.state == "failed"]
    return failures, [d for d in failures if not d.startswith("[infrastructure]")]


def wait_for(predicate: Callable[[], Any], timeout: float = 120, what: str = "") -> Any:
    """Poll ``predicate`` every 0.25 s until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stored_point_rows(
    database_url: str, trial_id: int, name: str | None = None
) -> Counter[tuple[int, str, int]]:
    """The trial's rows in ``metric_points`` as stored (not the API's read, which keeps one
    point per name and step), counted per (attempt, name, step); of metric ``name`` only if
    given. Read through an engine of its own, disposed of before it returns."""
    where = "trial_id = :trial" + ("" if name is None else " AND name = :name")
    engine = make_engine(database_url)
    try:
        # read-only: on SQLite a plain deferred transaction, not the write lock
        with engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execute(
                text(f"SELECT attempt, name, step FROM metric_points WHERE {where}"),
                {"trial": trial_id, "name": name},
            ).all()
    finally:
        engine.dispose()
    return Counter((int(attempt), str(metric), int(step)) for attempt, metric, step in rows)


def assert_each_point_stored_once(
    database_url: str,
    trial_id: int,
    expected_total: int | None = None,
    *,
    name: str | None = None,
    across_attempts: bool = False,
) -> Counter[tuple[int, str, int]]:
    """Count the trial's raw ``metric_points`` rows (of metric ``name``, if given): none may
    repeat an (attempt, name, step), and ``expected_total`` (if given) is how many there must
    be. ``across_attempts``: neither may one (name, step) be stored by two attempts (a resumed
    attempt that sends again only what was never stored). Returns the rows' counts."""
    counts = stored_point_rows(database_url, trial_id, name)
    twice = sorted(key for key, n in counts.items() if n > 1)
    assert twice == [], f"trial {trial_id}: (attempt, name, step) stored twice: {twice}"
    if across_attempts:
        per_step = Counter((metric, step) for _, metric, step in counts)
        again = sorted(key for key, n in per_step.items() if n > 1)
        assert again == [], f"trial {trial_id}: (name, step) stored by several attempts: {again}"
    if expected_total is not None:
        total = counts.total()
        assert total == expected_total, f"trial {trial_id}: {total} rows, not {expected_total}"
    return counts
