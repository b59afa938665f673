"""Drill: the control plane pauses (its database is down, or ``hpo serve`` is frozen by
SIGSTOP) for twice ``lease_s`` while clients keep heartbeating every second.

A lease only runs out after its client had a whole ``lease_s`` of working control plane to
renew it: no live trial is lost to the pause, and a trial whose client is dead still fails
with "lease expired", ``lease_s`` after the pause ended (not at once).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import ServerProcess, simple_spec
from tests.faults.conftest import OwnPostgres, poll_until

LEASE_S = 3
PAUSE_S = 6.0
LIVE = 4


class Client:
    """A live client: heartbeats every second (waiting out 503s and dropped connections)
    until stopped, then tells its value, resending while the answer is a 503."""

    def __init__(self, server: ServerProcess, trial: dict) -> None:
        self.server, self.trial = server, trial
        self.stop = threading.Event()
        self.tell_code: int | None = None
        self.thread = threading.Thread(target=self._run)

    def _post(self, http: httpx.Client, path: str, **kw: object) -> httpx.Response | None:
        headers = {"Authorization": f"Bearer {self.trial['attempt_token']}"}
        try:
            return http.post(path, headers=headers, **kw)
        except httpx.TransportError:
            return None

    def _run(self) -> None:
        tid = self.trial["trial_id"]
        with httpx.Client(base_url=self.server.url, timeout=60) as http:
            while not self.stop.wait(1.0):
                self._post(http, f"/api/v1/trials/{tid}/heartbeat")
            for _ in range(100):
                r = self._post(http, f"/api/v1/trials/{tid}/tell", json={"value": 1.0})
                if r is not None and r.status_code != 503:
                    self.tell_code = r.status_code
                    return
                time.sleep(0.3)


def _drill(server: ServerProcess, pause: Callable[[], None], resume: Callable[[], None]) -> None:
    with server.http() as http:
        r = http.post("/api/v1/studies", json=simple_spec("pause", lease_s=LEASE_S, max_retries=0))
        sid = r.json()["id"]
        live = [Client(server, http.post(f"/api/v1/studies/{sid}/ask").json()) for _ in range(LIVE)]
        dead = http.post(f"/api/v1/studies/{sid}/ask").json()["trial_id"]  # never heartbeats
    for c in live:
        c.thread.start()
    time.sleep(1.5)
    pause()
    time.sleep(PAUSE_S)
    resume()
    resumed = time.monotonic()
    time.sleep(1.0)
    with server.http() as http:

        def state(tid: int) -> dict:
            return http.get(f"/api/v1/trials/{tid}").json()

        early = state(dead)["state"]  # the dead client's lease runs out lease_s after resuming
        failed = poll_until(lambda: state(dead)["state"] == "failed", timeout=LEASE_S + 10)
        failed_after = time.monotonic() - resumed
        for c in live:
            c.stop.set()
        for c in live:
            c.thread.join(timeout=60)
        finals = [state(c.trial["trial_id"]) for c in live]
        dead_trial = state(dead)
    report = (
        f"live {[f['state'] for f in finals]} (errors {[f.get('error') for f in finals]}), "
        f"tells {[c.tell_code for c in live]}; dead trial {early} 1 s after the pause, "
        f"failed {failed_after:.1f} s after ({dead_trial.get('error')})"
    )
    assert all(f["state"] == "complete" for f in finals), report
    assert [c.tell_code for c in live] == [200] * LIVE, report
    assert failed and dead_trial["error"] == "lease expired", report
    assert early == "running", report


def test_a_database_outage_longer_than_the_lease_loses_no_live_trial(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    server = ServerProcess(own_postgres.url, tmp_path, {"HPO_SCHEDULER": "false"})
    server.start()
    try:
        _drill(server, lambda: own_postgres.stop("immediate"), own_postgres.start)
    finally:
        server.stop()


def test_a_frozen_server_loses_no_live_trial(sqlite_server: ServerProcess) -> None:
    pgid = os.getpgid(sqlite_server.proc.pid)
    _drill(
        sqlite_server,
        lambda: os.killpg(pgid, signal.SIGSTOP),
        lambda: os.killpg(pgid, signal.SIGCONT),
    )
