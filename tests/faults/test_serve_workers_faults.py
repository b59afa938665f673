"""Drills for ``hpo serve --workers N``: the faults of the single-process drills, with every
request on a connection of its own so the kernel spreads them over the workers.

- Two ``hpo serve --workers 2`` on one database (four processes): racing asks hand out every
  grid point and budget slot once, a burst of asks through one server gets a trial each, and
  one scheduler leads (each process publishes its own role). The uniqueness itself is the
  database's (unique keys on number and key); the drill checks that no worker answers a lost
  race with an error or a second trial.
- Replays and stale attempts that reach a different worker than the first answer: one trial
  per Idempotency-Key, a batch sent twice answered 200 both times and stored once, and every
  write of a superseded attempt refused as ``stale_attempt``.
- The database down for longer than twice the hang limit: every answer is a 503 with
  ``Retry-After``; and the database stalled (its processes stopped) as long: the requests
  wait in threads while every event loop beats. Either way no worker is taken for hung and
  the stream loses and duplicates nothing.
- kill -9 of a worker while trials stream, then a restart on the same port: every step of
  every trial stored once.

Each drill counts per worker what it answered (the counters each worker publishes), so a
drill whose requests all reached one worker fails instead of passing for nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.api.test_concurrency import GRID_SPACE, race
from tests.api.test_serve_workers import (
    answered,
    folder_of,
    fresh_get,
    published,
    role_of,
    workers_of,
)
from tests.conftest import ServerProcess, assert_each_point_stored_once, simple_spec, wait_for
from tests.faults.conftest import OwnPostgres
from tests.faults.test_database_outage import (
    STEPS,
    Poller,
    Stream,
    assert_nothing_lost,
    finished,
    started,
)

ASK = "/api/v1/studies/{study_id}/ask"
TELL = "/api/v1/trials/{trial_id}/tell"
METRICS = "/api/v1/trials/{trial_id}/metrics"
HEARTBEAT = "/api/v1/trials/{trial_id}/heartbeat"


@contextlib.contextmanager
def two_workers(
    db_url: str, data_dir: Path, env: dict[str, str] | None = None, token: str | None = None
) -> Iterator[tuple[ServerProcess, Path]]:
    """``hpo serve --workers 2`` (no scheduler unless ``env`` turns it on), once both of its
    workers have published; yields it and its shared folder."""
    data_dir.mkdir(exist_ok=True)
    proc = ServerProcess(
        db_url, data_dir, {"HPO_SCHEDULER": "false", **(env or {})}, args=["--workers", "2"]
    )
    if token is not None:
        proc.token = token
    with proc:
        folder = folder_of(workers_of(proc)[0])
        wait_for(lambda: all(published(folder, i) for i in (0, 1)), timeout=60)
        yield proc, folder


def settled(folder: Path, route: str, expected: int, method: str = "POST") -> list[Counter[str]]:
    """Each worker's answers to ``route``, once both workers published ``expected`` in all
    (they publish every second)."""

    def both() -> list[Counter[str]] | None:
        counts = [answered(folder, i, route, method) for i in (0, 1)]
        return counts if sum(c.total() for c in counts) == expected else None

    return wait_for(both, timeout=15, what=f"{expected} answers to {route} published")


def fresh(proc: ServerProcess, token: str | None = None) -> httpx.Client:
    """A client that closes its connection after every answer: each request is accepted anew,
    by whichever worker the kernel wakes."""
    http = proc.http(token)
    http.headers["Connection"] = "close"
    return http


def scheduler_role(proc: ServerProcess) -> str:
    return fresh_get(proc, "/healthz").json()["scheduler"]


def test_two_servers_of_two_workers_hand_out_each_trial_once(db_url: str, tmp_path: Path) -> None:
    """Four processes on one database, with the scheduler on: one of them leads."""
    scheduler_on = {"HPO_SCHEDULER": "true"}
    with (
        two_workers(db_url, tmp_path / "a", scheduler_on, token="shared") as (a, folder_a),
        two_workers(db_url, tmp_path / "b", scheduler_on, token="shared") as (b, folder_b),
    ):
        wait_for(
            lambda: sorted(scheduler_role(p) for p in (a, b)) == ["running", "standby"],
            timeout=30,
            what="one server's scheduler leading, the other's standing by",
        )

        grid = simple_spec("grid-race", sampler={"type": "grid"}, space=GRID_SPACE)
        with fresh(a) as http:
            grid_id = http.post("/api/v1/studies", json=grid).json()["id"]
            budget_id = http.post(
                "/api/v1/studies", json=simple_spec("budget-race", budget={"max_trials": 17})
            ).json()["id"]
            burst_id = http.post("/api/v1/studies", json=simple_spec("burst")).json()["id"]

        handed = race([a, b], grid_id, fresh=True)
        points = [(t["params"]["a"], t["params"]["b"]) for t in handed]
        assert len(points) == 24 == len(set(points))
        assert sorted(t["number"] for t in handed) == list(range(24))

        handed = race([a, b], budget_id, fresh=True)
        assert sorted(t["number"] for t in handed) == list(range(17))
        assert len({t["trial_id"] for t in handed}) == 17

        # 64 asks at once through one server: its workers race each other in the database
        def ask(_: int) -> httpx.Response:
            with fresh(a) as own:
                return own.post(ASK.format(study_id=burst_id))

        with ThreadPoolExecutor(64) as pool:
            burst = list(pool.map(ask, range(64)))
        assert [r.status_code for r in burst] == [201] * 64, [
            r.text for r in burst if r.status_code != 201
        ][:3]
        assert sorted(r.json()["number"] for r in burst) == list(range(64))

        with fresh(b) as http:
            for study_id, n in ((grid_id, 24), (budget_id, 17), (burst_id, 64)):
                study = http.get(f"/api/v1/studies/{study_id}").json()
                assert study["n_trials"] == n
                trials = http.get(f"/api/v1/studies/{study_id}/trials").json()["trials"]
                assert len(trials) == n == len({t["number"] for t in trials})
            assert http.get(f"/api/v1/studies/{grid_id}").json()["state"] == "completed"

        # every one of the four processes answered asks: the race was among all of them (more
        # rounds of asks through both servers while the kernel left one of them out)
        folders = [folder_a, folder_b]

        def granted() -> list[int]:
            return [answered(f, i, ASK)["201"] for f in folders for i in (0, 1)]

        expected = 24 + 17 + 64
        for more in range(5):
            wait_for(lambda n=expected: sum(granted()) == n, timeout=15, what="asks published")
            if all(n > 0 for n in granted()):
                break
            spec = simple_spec(f"more-{more}", budget={"max_trials": 24})
            with fresh(a) as http:
                extra = http.post("/api/v1/studies", json=spec).json()["id"]
            assert len(race([a, b], extra, fresh=True)) == 24
            expected += 24
        assert all(n > 0 for n in granted()), granted()
        # and each process ran the scheduler it should: worker 0 of each (one leading), no other
        roles = sorted(role_of(f, i) for f in folders for i in (0, 1))
        assert roles == ["off", "off", "running", "standby"], roles


def test_replays_and_stale_attempts_reaching_either_worker(db_url: str, tmp_path: Path) -> None:
    """An Idempotency-Key replayed to both workers at once makes one trial; once the trial was
    handed out again, no replay of the first ask and no write with the first attempt's token
    is accepted by either worker (each refused as ``stale_attempt``), while the live
    attempt's writes all are (each of its batches sent twice, answered 200 twice, read back
    once)."""
    with two_workers(db_url, tmp_path) as (proc, folder):
        with fresh(proc) as http:
            sid = http.post("/api/v1/studies", json=simple_spec("replays")).json()["id"]
            stale_sid = http.post(
                "/api/v1/studies", json=simple_spec("stale", lease_s=3.0, max_retries=1)
            ).json()["id"]

        def ask(study_id: int, key: str) -> httpx.Response:
            with fresh(proc) as own:
                return own.post(ASK.format(study_id=study_id), headers={"Idempotency-Key": key})

        # rounds of 32 concurrent replays of one key, until both workers answered some
        for n in range(1, 6):
            with ThreadPoolExecutor(16) as pool:
                replays = list(pool.map(lambda _, k=f"key-{n}": ask(sid, k), range(32)))
            assert [r.status_code for r in replays] == [201] * 32, [r.text for r in replays][:3]
            assert len({(r.json()["trial_id"], r.json()["attempt"]) for r in replays}) == 1
            if all(c["201"] > 0 for c in settled(folder, ASK, 32 * n)):
                break
        else:
            pytest.fail("five rounds of replays all reached one worker: the drill proved nothing")
        with fresh(proc) as http:
            assert http.get(f"/api/v1/studies/{sid}").json()["n_trials"] == n

        first = ask(stale_sid, "KA").json()
        tid, old_token = first["trial_id"], first["attempt_token"]
        with fresh(proc, old_token) as own:  # the first attempt's writes while it is current
            for step in range(1, 6):
                body = {"points": [{"step": step, "name": "loss", "value": 1.0}]}
                assert own.post(METRICS.format(trial_id=tid), json=body).status_code == 200
        with fresh(proc) as http:
            wait_for(
                lambda: http.get(f"/api/v1/trials/{tid}").json()["state"] == "waiting",
                timeout=30,
                what="the first attempt's lease to expire",
            )
        live = ask(stale_sid, "KB").json()
        assert (live["trial_id"], live["attempt"]) == (tid, 2)

        def stale(i: int) -> httpx.Response:
            """The first attempt's client goes on as if nothing happened."""
            kind = i % 4
            if kind == 0:
                return ask(stale_sid, "KA")
            with fresh(proc, old_token) as own:
                if kind == 1:
                    body = {"points": [{"step": 100 + i, "name": "loss", "value": 9.0}]}
                    return own.post(METRICS.format(trial_id=tid), json=body)
                if kind == 2:
                    return own.post(HEARTBEAT.format(trial_id=tid))
                return own.post(TELL.format(trial_id=tid), json={"value": 9.0})

        def current(i: int) -> httpx.Response:
            """The live attempt's batch of step ``i // 2 + 1``, each sent twice."""
            with fresh(proc, live["attempt_token"]) as own:
                body = {"points": [{"step": i // 2 + 1, "name": "loss", "value": 0.5}]}
                return own.post(METRICS.format(trial_id=tid), json=body)

        done, beats, failures = threading.Event(), Counter[int](), list[BaseException]()

        def keep_alive() -> None:
            """The live attempt's client heartbeats within its lease meanwhile."""
            try:
                while not done.is_set():
                    with fresh(proc, live["attempt_token"]) as own:
                        beats[own.post(HEARTBEAT.format(trial_id=tid)).status_code] += 1
                    time.sleep(0.2)
            except BaseException as exc:  # reported by the test's thread
                failures.append(exc)

        keeper = threading.Thread(target=keep_alive)
        keeper.start()
        try:
            with ThreadPoolExecutor(16) as pool:
                late = pool.map(stale, range(64))
                ours = pool.map(current, range(40))
                late, ours = list(late), list(ours)
        finally:
            done.set()
            keeper.join(timeout=30)
        assert failures == [] and set(beats) == {200}, (failures, beats)
        wrongly_accepted = [(r.request.url.path, r.status_code) for r in late if r.is_success]
        assert wrongly_accepted == []
        assert {(r.status_code, r.json()["error"]) for r in late} == {(409, "stale_attempt")}, {
            r.text for r in late
        }
        assert [r.status_code for r in ours] == [200] * 40

        with fresh(proc, live["attempt_token"]) as own:
            assert own.post(TELL.format(trial_id=tid), json={"value": 0.5}).status_code == 200
        with fresh(proc) as http:
            trial = http.get(f"/api/v1/trials/{tid}").json()
            stored = http.get(f"/api/v1/trials/{tid}/metrics").json()["points"]
            n_trials = http.get(f"/api/v1/studies/{stale_sid}").json()["n_trials"]
        assert (trial["state"], trial["value"], n_trials) == ("complete", 0.5, 1)
        # read back one point per step, the newest attempt's: the live one's 20 steps, once
        assert sorted((p["step"], p["attempt"]) for p in stored) == [
            (step, 2) for step in range(1, 21)
        ]
        # and as rows: the first attempt's 5 steps and the live one's 20, each batch sent
        # twice stored once, none of the stale attempt's late points (steps 100 and up)
        rows = assert_each_point_stored_once(proc.database_url, tid, 5 + 20)
        assert set(rows) == {(1, "loss", s) for s in range(1, 6)} | {
            (2, "loss", s) for s in range(1, 21)
        }

        # both workers refused some of the 64 stale requests (asks, metrics, heartbeats, tells)
        def refused(i: int) -> int:
            return sum(
                answered(folder, i, route)["409"] for route in (ASK, METRICS, HEARTBEAT, TELL)
            )

        wait_for(lambda: refused(0) + refused(1) == 64, timeout=15, what="refusals published")
        assert refused(0) > 0 and refused(1) > 0, (refused(0), refused(1))


@contextlib.contextmanager
def streaming(
    own_postgres: OwnPostgres, tmp_path: Path
) -> Iterator[tuple[ServerProcess, Path, Stream]]:
    """``hpo serve --workers 2`` (hang limit 5 s) on ``own_postgres``, one trial streaming a
    point per step and a page polling its study, each request on a fresh connection. When
    the block ends: the stream must finish, with no worker replaced, nothing lost or
    duplicated, and both workers having answered it."""
    with two_workers(own_postgres.url, tmp_path, {"HPO_WORKER_HANG_S": "5"}) as (proc, folder):
        pids = [w.pid for w in workers_of(proc)]
        with fresh(proc) as http:
            study = http.post("/api/v1/studies", json=simple_spec("db", lease_s=600)).json()
            trial = http.post(ASK.format(study_id=study["id"])).json()
        stream = Stream(proc, trial["trial_id"], fresh=True)
        poller = Poller(proc, study["id"], fresh=True)
        threads = started(stream, poller)
        time.sleep(1.5)
        yield proc, folder, stream
        finished(threads, poller)

        assert proc.proc is not None and proc.proc.poll() is None, "hpo serve stopped"
        assert [w.pid for w in workers_of(proc)] == pids, "a worker was replaced"
        assert "has not beaten" not in proc.log_path.read_text()
        with fresh(proc) as http:
            points = http.get(METRICS.format(trial_id=trial["trial_id"])).json()["points"]
        assert_nothing_lost(points, stream, poller, proc.database_url)
        answers = settled(folder, METRICS, stream.codes.total())
        assert all(c["200"] > 0 for c in answers), answers


def test_a_database_outage_under_two_workers_loses_nothing(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    """12 s without the database, more than twice the hang limit here (5 s): the workers'
    event loops go on beating, so nothing is killed, and every answer meanwhile is a 503 with
    ``Retry-After`` from whichever worker took the connection."""
    with streaming(own_postgres, tmp_path) as (proc, folder, _):
        own_postgres.stop("immediate")
        try:
            time.sleep(12)
            health = [fresh_get(proc, "/healthz") for _ in range(4)]
            assert [h.status_code for h in health] == [503] * 4, [h.text for h in health]
            # both workers answered the stream's writes with 503s meanwhile
            wait_for(
                lambda: all(answered(folder, i, METRICS)["503"] > 0 for i in (0, 1)),
                timeout=10,
                what="503s from both workers",
            )
        finally:
            own_postgres.start()


def test_a_stalled_database_under_two_workers_is_waited_out(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    """Every PostgreSQL process stopped (SIGSTOP) for 12 s: connections open but nothing
    answers, so the requests' database calls hang. They hang in threads, never on a worker's
    event loop: no worker misses its beat for the 5-s hang limit, and once the database
    continues every step of the stream is stored once."""
    with streaming(own_postgres, tmp_path) as (proc, _, stream):
        postmaster = psutil.Process(
            int((own_postgres.data / "postmaster.pid").read_text().split()[0])
        )
        postmaster.suspend()  # first: a stopped postmaster starts no new backend
        database = [postmaster, *postmaster.children(recursive=True)]
        for p in database[1:]:
            p.suspend()
        try:
            time.sleep(2)
            answered_then = stream.codes.total()
            time.sleep(10)
            # the stall held the stream: no answer in those 10 s (else it proved nothing)
            assert stream.codes.total() == answered_then, stream.codes
            assert proc.proc is not None and proc.proc.poll() is None, "hpo serve stopped"
        finally:
            for p in database:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.resume()


def test_a_worker_killed_mid_stream_then_a_restart_loses_nothing(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    """kill -9 of one worker while three trials stream: ``hpo serve`` stops (status 1), a
    process manager starts it again on the same port, and the trials' reporters, resending
    every step until it is answered 200, end with each of their steps stored exactly once."""
    with two_workers(own_postgres.url, tmp_path) as (proc, _):
        with fresh(proc) as http:
            study = http.post("/api/v1/studies", json=simple_spec("k9", lease_s=600)).json()
            trials = [http.post(ASK.format(study_id=study["id"])).json() for _ in range(3)]
        streams = [Stream(proc, t["trial_id"], fresh=True) for t in trials]
        poller = Poller(proc, study["id"], fresh=True)
        runs = [started(stream, poller) for stream in streams]
        time.sleep(1.5)
        workers_of(proc)[1].kill()
        assert proc.proc is not None and proc.proc.wait(timeout=60) == 1
        proc.start()  # the process manager's restart
        for threads in runs:  # each stream must finish once the server is back
            finished(threads, poller)
        assert sum(stream.dropped for stream in streams) > 0, "the kill was never seen"
        for stream, trial in zip(streams, trials, strict=True):
            with fresh(proc) as http:
                points = http.get(METRICS.format(trial_id=trial["trial_id"])).json()["points"]
            steps = Counter(p["step"] for p in points)
            lost = [s for s in range(1, STEPS + 1) if steps[s] == 0]
            duplicated = [s for s, n in steps.items() if n > 1]
            assert (lost, duplicated) == ([], []), trial["trial_id"]
            assert stream.failures == [], (trial["trial_id"], stream.failures)
            # the read keeps one point per step whatever is stored: count the rows
            stored = assert_each_point_stored_once(
                proc.database_url, trial["trial_id"], STEPS, across_attempts=True
            )
            assert {step for _, _, step in stored} == set(range(1, STEPS + 1))
            assert stream.codes[500] == 0
