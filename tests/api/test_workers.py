"""``hpo serve --workers N``: N server processes on one port, one database.

Each worker is the whole app, as a replica is (the two-server tests in test_concurrency.py
hold the database's side of that); what is its own here is the port they share, the
Prometheus counters they sum, and the shutdown that ends them all.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import ServerProcess, simple_spec

API = "/api/v1"
TRIALS = 12


def _workers(server: ServerProcess) -> list[psutil.Process]:
    """The server's worker processes (uvicorn spawns them; the resource tracker aside)."""
    assert server.proc is not None
    children = psutil.Process(server.proc.pid).children(recursive=True)
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())]


def _scraped(server: ServerProcess, name: str) -> float:
    """The sum of a counter's series in one scrape of ``/metrics``."""
    with server.http() as http:
        text = http.get("/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_workers_share_one_port_count_together_and_stop_together(
    db_url: str, tmp_path: Path
) -> None:
    env = {"HPO_SCHEDULER": "false", "HPO_WORKERS": "2"}
    with ServerProcess(db_url, tmp_path, env) as server:
        workers = _workers(server)
        assert len(workers) == 2, [w.cmdline() for w in workers]
        [folder] = {w.environ()["PROMETHEUS_MULTIPROC_DIR"] for w in workers}

        with server.http() as http:
            r = http.post(f"{API}/studies", json=simple_spec("w", budget={"max_trials": TRIALS}))
            assert r.status_code == 201, r.text
            study_id = r.json()["id"]

        # Asks racing from 24 threads, each on connections of its own (a new one a request),
        # so both workers take some: the budget holds across them.
        asked: list[dict] = []
        sent = {"asks": 0, "points": 0}
        lock = threading.Lock()

        def ask_and_report() -> None:
            headers = {"Authorization": f"Bearer {server.token}", "Connection": "close"}
            with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
                r = http.post(f"{API}/studies/{study_id}/ask")
                with lock:
                    sent["asks"] += 1
                if r.status_code != 201:
                    assert r.status_code == 409, r.text
                    return
                t = r.json()
                points = [{"step": s, "name": "loss", "value": 1.0 / (1 + s)} for s in range(5)]
                auth = {"Authorization": f"Bearer {t['attempt_token']}", "Connection": "close"}
                for _ in range(2):  # the batch, then the same batch again (a lost answer)
                    body = {"points": points, "attempt": t["attempt"]}
                    r = http.post(f"{API}/trials/{t['trial_id']}/metrics", json=body, headers=auth)
                    assert r.status_code == 200, r.text
                with lock:
                    asked.append(t)
                    sent["points"] += 2 * len(points)

        threads = [threading.Thread(target=ask_and_report) for _ in range(2 * TRIALS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

        assert sorted(t["number"] for t in asked) == list(range(TRIALS))
        with server.http() as http:
            for t in asked:  # each point stored once, whichever worker took which send
                points = http.get(f"{API}/trials/{t['trial_id']}/metrics").json()["points"]
                assert [p["step"] for p in points] == list(range(5))

        # Every worker counted into the shared folder, and any scrape sums them all.
        files = {p.name for p in Path(folder).iterdir()}
        for w in workers:
            assert f"counter_{w.pid}.db" in files, (w.pid, files)
        for _ in range(4):  # scrapes land on either worker: the same sums
            assert _scraped(server, "hpo_asks_total") == sent["asks"]
            assert _scraped(server, "hpo_metric_points_ingested_total") == sent["points"]

    # Stopped: no worker left behind, the counters' folder gone.
    deadline = time.monotonic() + 30
    while any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers):
        assert time.monotonic() < deadline, "a worker outlived hpo serve"
        time.sleep(0.2)
    assert not Path(folder).exists()


def test_workers_end_when_hpo_serve_is_killed(sqlite_url: str, tmp_path: Path) -> None:
    """SIGKILL to ``hpo serve`` alone (not its process group): its workers notice they lost
    their parent and stop, so nothing is left serving on the port."""
    server = ServerProcess(sqlite_url, tmp_path, {"HPO_SCHEDULER": "false", "HPO_WORKERS": "2"})
    with server:
        workers = _workers(server)
        assert len(workers) == 2
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert alive == [], [w.pid for w in alive]
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url + "/healthz", timeout=2)
