"""``hpo serve --workers N`` (hpo.api.serving): real server processes on one port.

Counted: which worker answered (each worker's own published counters), what ``/metrics``
sums, where the studies went (the CLI's database, not the environment's), and what is left
running after a worker or the supervisor is killed."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, inspect, text

from tests.api.test_metrics_endpoint import scrape, value
from tests.conftest import ServerProcess, free_port, simple_spec, wait_for

STUDIES = "/api/v1/studies"


def workers_of(proc: ServerProcess) -> list[psutil.Process]:
    """The workers of ``hpo serve``, worker 0 first."""
    assert proc.proc is not None
    workers = [
        p
        for p in psutil.Process(proc.proc.pid).children()
        if "hpo.api.serving" in " ".join(p.cmdline())
    ]
    return sorted(workers, key=lambda p: int(p.environ()["HPO_SERVE_WORKER"]))


def folder_of(worker: psutil.Process) -> Path:
    return Path(worker.environ()["HPO_SERVE_FOLDER"])


def answered(folder: Path, index: int, route: str, method: str = "POST") -> Counter[str]:
    """What worker ``index`` last published of its answers to ``route``, by status."""
    text = json.loads((folder / f"{index}.json").read_text())["metrics"]
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "hpo_http_requests_total" and (s.labels["route"], s.labels["method"]) == (
                route,
                method,
            ):
                counts[s.labels["status"]] += int(s.value)
    return counts


def own_count(folder: Path, index: int, route: str, method: str) -> int:
    """What worker ``index`` last published of its requests to ``route``."""
    return answered(folder, index, route, method).total()


def counted(folder: Path, route: str) -> float:
    """The GET requests to ``route`` that both workers published."""
    return sum(own_count(folder, i, route, "GET") for i in (0, 1))


def fresh_get(proc: ServerProcess, path: str) -> httpx.Response:
    """One request on a connection of its own (the kernel picks the worker that accepts it)."""
    headers = {"Authorization": f"Bearer {proc.token}", "Connection": "close"}
    return httpx.get(proc.url + path, headers=headers, timeout=30)


def gone(pids: list[int]) -> bool:
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return not any(alive(pid) for pid in pids)


@contextlib.contextmanager
def served_by_two(
    tmp_path: Path, env: dict[str, str]
) -> Iterator[tuple[ServerProcess, Path, Path]]:
    """``hpo serve --workers 2``; the environment names one database, the options another.
    In the data directory: the shared folder of a supervisor killed with its workers (its
    lock free), and one of a running server (its lock held here)."""
    env_db, cli_db = tmp_path / "env.db", tmp_path / "cli.db"
    leftover, live = tmp_path / "serve-leftover", tmp_path / "serve-live"
    for folder in (leftover, live):
        folder.mkdir()
        (folder / "supervisor.lock").touch()
    held = os.open(live / "supervisor.lock", os.O_RDWR)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with ServerProcess(
            f"sqlite:///{env_db}",
            tmp_path,
            env,  # the scheduler on: worker 0 runs it (no study needs Ray here)
            args=["--workers", "2", "--database-url", f"sqlite:///{cli_db}"],
        ) as proc:
            assert not leftover.exists()
            assert live.exists()
            # /healthz answered: one worker is up; the other may still be starting
            folder = folder_of(workers_of(proc)[0])
            wait_for(lambda: all(published(folder, i) for i in (0, 1)), timeout=60)
            wait_for(lambda: role_of(folder) == "running", timeout=30)  # the lease taken
            yield proc, env_db, cli_db
    finally:
        os.close(held)


def published(folder: Path, index: int) -> bool:
    """Whether worker ``index`` has started and published (the supervisor's placeholder for
    worker 0 has no series)."""
    try:
        return json.loads((folder / f"{index}.json").read_text())["metrics"] != ""
    except FileNotFoundError:
        return False


def role_of(folder: Path, index: int = 0) -> str:
    """The scheduler's role worker ``index`` published of itself."""
    return json.loads((folder / f"{index}.json").read_text())["scheduler"]


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path, Path]]:
    with served_by_two(tmp_path, {}) as served:
        yield served


def test_two_workers_share_the_port_the_options_and_one_scheduler_and_metrics_sum_both(
    two_workers: tuple[ServerProcess, Path, Path],
) -> None:
    proc, env_db, cli_db = two_workers
    workers = workers_of(proc)
    assert len(workers) == 2
    folder = folder_of(workers[0])
    with proc.http() as http:
        created = http.post(STUDIES, json=simple_spec(name="two-workers"))
    assert created.status_code == 201, created.text
    n, roles = 0, []
    with ThreadPoolExecutor(8) as pool:
        # rounds of requests, each on a connection of its own, until both workers answered
        # some (the kernel does not promise to spread them; it did in the first round here)
        for _ in range(5):
            statuses = list(pool.map(lambda _: fresh_get(proc, STUDIES).status_code, range(120)))
            assert statuses == [200] * 120
            n += 120
            roles += pool.map(lambda _: fresh_get(proc, "/healthz").json()["scheduler"], range(40))
            # each worker publishes its counters every second
            wait_for(lambda sent=n: counted(folder, STUDIES) == sent, timeout=10)
            if all(own_count(folder, i, "/healthz", "GET") > 0 for i in (0, 1)):
                break
    # both workers answered, and every /healthz names the scheduler worker 0 runs
    assert all(own_count(folder, i, STUDIES, "GET") > 0 for i in (0, 1))
    assert all(own_count(folder, i, "/healthz", "GET") > 0 for i in (0, 1))
    assert roles == ["running"] * len(roles)
    # whichever worker answers a scrape, it sums both
    for _ in range(6):
        samples = scrape(proc)
        assert (
            value(samples, "hpo_http_requests_total", route=STUDIES, method="GET", status="200")
            == n
        )
        assert value(samples, "hpo_scheduler_leading") == 1.0
        assert value(samples, "hpo_studies", state="running") == 1  # from the database
    # the --database-url option reached both workers: the study is there, not in $HPO_DATABASE_URL
    engine = create_engine(f"sqlite:///{cli_db}")
    with engine.connect() as conn:
        names = conn.execute(text("SELECT name FROM studies")).scalars().all()
    engine.dispose()
    assert names == ["two-workers"]
    assert (
        not env_db.exists()
        or "studies" not in inspect(create_engine(f"sqlite:///{env_db}")).get_table_names()
    )


def ends_with(
    proc: ServerProcess, act: Callable[[list[psutil.Process]], object], status: int
) -> str:
    """Do ``act`` to the server's workers; then ``hpo serve`` must exit with ``status``,
    leaving no worker and no shared folder. Returns its log."""
    assert proc.proc is not None
    workers = workers_of(proc)
    folder = folder_of(workers[0])
    act(workers)
    assert proc.proc.wait(timeout=60) == status
    assert gone([w.pid for w in workers])
    assert not folder.exists()
    return proc.log_path.read_text()


def test_a_killed_worker_stops_the_server_with_status_1_and_nothing_keeps_serving(
    two_workers: tuple[ServerProcess, Path, Path],
) -> None:
    proc, _, _ = two_workers
    log = ends_with(proc, lambda workers: workers[1].kill(), 1)
    assert "worker 1" in log and "exited with status -9" in log
    with pytest.raises(httpx.TransportError):
        httpx.get(proc.url + "/livez", timeout=2)


def test_killing_hpo_serve_stops_its_workers(two_workers: tuple[ServerProcess, Path, Path]) -> None:
    proc, _, _ = two_workers
    assert proc.proc is not None
    workers = workers_of(proc)
    folder = folder_of(workers[0])
    pids = [w.pid for w in workers]
    os.kill(proc.proc.pid, signal.SIGKILL)  # the supervisor only, not its process group
    killed_at = time.monotonic()
    proc.proc.wait(timeout=10)
    # README: a worker whose `hpo serve` was killed is told to stop within a quarter of a
    # second. Measured to the workers' exit (their shutdown included), with slack for a
    # loaded 2-core machine.
    deadline = killed_at + 20
    while not gone(pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    stopped_in = time.monotonic() - killed_at
    assert gone(pids), f"workers still running {stopped_in:.1f} s after the kill"
    assert stopped_in <= 2.0, f"the workers stopped {stopped_in:.2f} s after the kill"
    wait_for(lambda: not folder.exists(), timeout=5)
    with pytest.raises(httpx.TransportError):
        httpx.get(proc.url + "/livez", timeout=2)


def test_sigterm_stops_every_worker_with_status_0(
    two_workers: tuple[ServerProcess, Path, Path],
) -> None:
    proc, _, _ = two_workers
    assert proc.proc is not None
    ends_with(proc, lambda _: proc.proc.send_signal(signal.SIGTERM), 0)


def test_configuration_warnings_are_logged_once_not_once_per_worker(tmp_path: Path) -> None:
    # A Ray address without shared storage or a public URL, and no auth: three warnings. The
    # scheduler is off, so nothing here reaches that address.
    env = {"HPO_RAY_ADDRESS": "127.0.0.1:1", "HPO_SCHEDULER": "false", "HPO_AUTH": "false"}
    with ServerProcess(
        f"sqlite:///{tmp_path / 'hpo.db'}", tmp_path, env, args=["--workers", "2"]
    ) as proc:
        folder = folder_of(workers_of(proc)[0])
        wait_for(lambda: all(published(folder, i) for i in (0, 1)), timeout=60)
        log = ends_with(proc, lambda _: proc.proc.send_signal(signal.SIGTERM), 0)
    assert log.count("HPO_RAY_ADDRESS is set without HPO_STORAGE_PATH") == 1, log
    assert log.count("HPO_RAY_ADDRESS is set without HPO_PUBLIC_URL") == 1, log
    assert log.count("HPO_AUTH=false: the API answers requests without a token") == 1, log
    assert "setup plugin" not in log  # alembic's list of its plugins, at every start


def test_a_port_in_use_is_an_error_before_any_worker_starts(tmp_path: Path) -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        env = {
            **os.environ,
            "HPO_DATA_DIR": str(tmp_path),
            "HPO_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
        }
        done = subprocess.run(
            [sys.executable, "-m", "hpo.api.cli", "serve", "--workers", "2", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    # refused before it says it serves, as any bad option (the supervisor's own check,
    # "cannot listen on", exit 1, remains for a port taken in between)
    assert done.returncode == 2, done.stderr
    assert f"cannot serve on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "workers started" not in done.stderr and "hpo serving on" not in done.stderr


def test_ctrl_c_to_the_process_group_stops_every_worker_with_status_0(
    two_workers: tuple[ServerProcess, Path, Path],
) -> None:
    """A terminal's Ctrl-C: SIGINT to hpo serve and its workers at once."""
    proc, _, _ = two_workers
    assert proc.proc is not None
    # ServerProcess starts it in a session of its own
    log = ends_with(proc, lambda _: os.killpg(proc.proc.pid, signal.SIGINT), 0)
    assert "Traceback" not in log


def test_a_stopped_worker_0_stops_the_server_with_status_1(tmp_path: Path) -> None:
    """SIGSTOP: the worker holds its connections and answers nothing, and the scheduler it
    runs dispatches nothing, while its sibling would go on saying "running". Here a worker
    whose event loop does not beat for 5 s counts as hung (30 s by default)."""
    with served_by_two(tmp_path, {"HPO_WORKER_HANG_S": "5"}) as (proc, _, _):
        log = ends_with(proc, lambda workers: workers[0].suspend(), 1)
        assert "worker 0" in log and "has not beaten in 5 s" in log


def test_a_pause_of_the_whole_server_is_not_taken_for_a_hang(tmp_path: Path) -> None:
    """Ctrl-Z then fg, ``docker pause``: every process stopped for longer than the hang limit,
    then continued; the supervisor must not kill a worker for the beats it could not send."""
    with served_by_two(tmp_path, {"HPO_WORKER_HANG_S": "5"}) as (proc, _, _):
        assert proc.proc is not None
        os.killpg(proc.proc.pid, signal.SIGSTOP)
        time.sleep(8)
        os.killpg(proc.proc.pid, signal.SIGCONT)
        time.sleep(8)  # beyond the limit again, now that all of them run
        assert proc.proc.poll() is None, proc.log_path.read_text()[-2000:]
        assert len(workers_of(proc)) == 2
        assert fresh_get(proc, "/healthz").status_code == 200
