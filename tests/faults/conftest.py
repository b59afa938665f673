"""Fault drills: real processes driven into the fault (kill -9, SIGSTOP, a second server, a
database outage, replayed requests), then counted: trials lost, duplicated; points lost,
duplicated; late writes accepted. Each count must be zero.

``own_postgres`` starts a PostgreSQL server of its own (initdb in a temporary directory, a free
port) so a drill can stop and start it without touching the machine's shared server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpo.api.demo import free_port
from tests.conftest import REQUIRE_POSTGRES


def postgres_part_missing(what: str) -> None:
    """Skip a drill that needs ``what`` of PostgreSQL, which is not installed; fail it when
    PostgreSQL's tests are required (``HPO_REQUIRE_POSTGRES=1``, as CI sets), so a drill
    never passes CI by not running."""
    if REQUIRE_POSTGRES:
        pytest.fail(f"{what} is not installed, and PostgreSQL is required (HPO_REQUIRE_POSTGRES=1)")
    pytest.skip(f"{what} is not installed")


def _pg_bin() -> Path | None:
    root = Path("/usr/lib/postgresql")
    for version in sorted(root.glob("*"), reverse=True) if root.is_dir() else []:
        if (version / "bin" / "initdb").exists():
            return version / "bin"
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class OwnPostgres:
    """A PostgreSQL server in its own data directory, started and stopped by the test."""

    def __init__(self, base: Path) -> None:
        bin_dir = _pg_bin()
        if bin_dir is None:
            postgres_part_missing("PostgreSQL's server binaries (initdb, pg_ctl)")
        self.bin = bin_dir
        self.base = base
        self.data = base / "pgdata"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self._as_user = ["runuser", "-u", "postgres", "--"]
            base.chmod(0o777)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self._as_user, *args], check=check, capture_output=True, text=True, timeout=120
        )

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        )

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.base}"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.base / "pg.log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: like a crash, open connections break)."""
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False
        )


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
    pg = OwnPostgres(Path(tempfile.mkdtemp(prefix="hpo-pg-")))
    pg.init()
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(pg.base)


def poll_until(predicate, timeout: float = 60.0, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
