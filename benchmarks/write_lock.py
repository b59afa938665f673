"""How long a large metrics batch holds SQLite's write lock, seen from an unrelated study.

First, in this process: ``StudyService.report`` stores ``--batches`` batches of 10,000 points
(the batch cap) on a fresh SQLite file, and every write transaction is timed from its
``BEGIN IMMEDIATE`` to its commit: how long each one held the write lock.

Then over HTTP: two ``hpo serve`` processes share a fresh SQLite file. A writer posts the same
batches to a trial of one study through the first, back to back; meanwhile a second client
sends a heartbeat for a trial of another study through the second server every 20 ms and times
each answer (a second process, so what it waits for is the database's write lock, not the
first server's event loop parsing the batch). A third probe takes SQLite's write lock directly
(``BEGIN IMMEDIATE; COMMIT``) every 5 ms and times the wait.

Each batch is stored in commits of ``POINTS_PER_COMMIT`` points (``--points-per-commit``
overrides it, here and in the served processes; ``10000`` is the old behaviour: one commit per
batch).

    python benchmarks/write_lock.py                              # chunked (1,000 per commit)
    python benchmarks/write_lock.py --points-per-commit 10000    # one commit per batch
"""

from __future__ import annotations

import argparse
import os
import secrets
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from hpo.api.demo import free_port

SERVE = (
    "import sys, hpo.service.reporting as s; s.POINTS_PER_COMMIT = int(sys.argv[1]); "
    "from hpo.api.cli import main; sys.exit(main(['serve', '--port', sys.argv[2]]))"
)
SPEC = {
    "objective": {"metric": "loss", "direction": "minimize"},
    "sampler": {"type": "random", "seed": 0},
    "space": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
    "lease_s": 600,
}


def serve(data: Path, per_commit: int, token: str) -> tuple[subprocess.Popen, str]:
    """Start ``hpo serve`` (no scheduler) on the SQLite file in ``data``; its process, URL."""
    port = free_port()
    env = {
        **os.environ,
        "HPO_DATABASE_URL": f"sqlite:///{data / 'hpo.db'}",
        "HPO_DATA_DIR": str(data),
        "HPO_TOKEN": token,
        "HPO_SCHEDULER": "false",
        "HPO_RATE_LIMIT_PER_S": "100000",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(per_commit), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("hpo serve did not come up")


def trial_of(http: httpx.Client, name: str) -> int:
    study = http.post("/api/v1/studies", json={"name": name, **SPEC}).json()
    return http.post(f"/api/v1/studies/{study['id']}/ask").json()["trial_id"]


def probe_lock(db: Path, done: threading.Event, waits: list[float]) -> None:
    """Take the write lock every 5 ms until ``done``; record how long each take waited."""
    conn = sqlite3.connect(db, timeout=60, isolation_level=None)
    while not done.is_set():
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        waits.append(time.perf_counter() - start)
        conn.execute("COMMIT")
        time.sleep(0.005)
    conn.close()


def _ms(values: list[float], q: float) -> float:
    values = sorted(values)
    return 1000 * values[int(q * (len(values) - 1))]


def run(per_commit: int, batches: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        token = secrets.token_urlsafe(16)
        proc, url = serve(Path(tmp), per_commit, token)
        other, other_url = serve(Path(tmp), per_commit, token)
        try:
            auth = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=other_url, headers=auth, timeout=120) as http:
                busy, quiet = trial_of(http, "busy"), trial_of(http, "quiet")
                latencies: list[float] = []
                lock_waits: list[float] = []
                batch_s: list[float] = []
                done = threading.Event()
                prober = threading.Thread(
                    target=probe_lock, args=(Path(tmp) / "hpo.db", done, lock_waits)
                )

                def write() -> None:
                    with httpx.Client(base_url=url, headers=auth, timeout=120) as own:
                        for b in range(batches):
                            points = [
                                {"step": b * 10_000 + i, "name": "loss", "value": 1.0 / (i + 1)}
                                for i in range(10_000)
                            ]
                            start = time.perf_counter()
                            r = own.post(f"/api/v1/trials/{busy}/metrics", json={"points": points})
                            r.raise_for_status()
                            batch_s.append(time.perf_counter() - start)
                    done.set()

                writer = threading.Thread(target=write)
                writer.start()
                prober.start()
                while not done.is_set():
                    start = time.perf_counter()
                    http.post(f"/api/v1/trials/{quiet}/heartbeat").raise_for_status()
                    latencies.append(time.perf_counter() - start)
                    time.sleep(0.02)
                writer.join()
                prober.join()
        finally:
            for p in (proc, other):
                p.terminate()
                p.wait(timeout=30)
    return {
        "heartbeats": len(latencies),
        "p50_ms": _ms(latencies, 0.5),
        "p99_ms": _ms(latencies, 0.99),
        "max_ms": _ms(latencies, 1.0),
        "lock_p50_ms": _ms(lock_waits, 0.5),
        "lock_p99_ms": _ms(lock_waits, 0.99),
        "lock_max_ms": _ms(lock_waits, 1.0),
        "batch_s": statistics.median(batch_s),
    }


def commit_holds(per_commit: int, batches: int) -> tuple[int, list[float], list[float]]:
    """Write commits per batch, how long each held the write lock, and how long each
    heartbeat of another study (sent every 5 ms by another thread of this process) took,
    while ``batches`` reports of 10,000 points each are stored on a fresh SQLite file."""
    from sqlalchemy import event

    from hpo.service import reporting, studies
    from hpo.service.db import make_engine, upgrade_schema
    from hpo.service.records import MetricInput
    from hpo.service.spec import StudySpec
    from hpo.service.storage import Storage

    reporting.POINTS_PER_COMMIT = per_commit
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'hpo.db'}")
        upgrade_schema(engine)
        service = studies.StudyService(Storage(engine))
        study = service.create_study(StudySpec.model_validate({"name": "busy", **SPEC}))
        trial = service.ask(study.id)
        quiet = service.create_study(StudySpec.model_validate({"name": "quiet", **SPEC}))
        quiet_trial = service.ask(quiet.id)
        holds: list[float] = []  # of the reports' commits (this thread's)
        beats: list[float] = []
        reporter = threading.get_ident()
        done = threading.Event()

        def beat() -> None:
            while not done.is_set():
                start = time.perf_counter()
                service.heartbeat(quiet_trial.id)
                beats.append(time.perf_counter() - start)
                time.sleep(0.005)

        began = [0.0]

        @event.listens_for(engine, "begin")
        def _began(conn) -> None:  # type: ignore[no-untyped-def]
            readonly = conn.get_execution_options().get("readonly")
            if threading.get_ident() == reporter and not readonly:
                began[0] = time.perf_counter()  # after the engine's own BEGIN IMMEDIATE

        @event.listens_for(engine, "commit")
        def _committed(conn) -> None:  # type: ignore[no-untyped-def]
            if threading.get_ident() == reporter and began[0]:
                holds.append(time.perf_counter() - began[0])
                began[0] = 0.0

        batches_of_points = [
            [MetricInput(b * 10_000 + i, "loss", 1.0 / (i + 1)) for i in range(10_000)]
            for b in range(batches)
        ]
        beater = threading.Thread(target=beat)
        beater.start()
        for points in batches_of_points:
            service.report(trial.id, points)
        done.set()
        beater.join()
        engine.dispose()
    return len(holds) // batches, holds, beats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points-per-commit", type=int, default=1_000)
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()
    per_batch, holds, beats = commit_holds(args.points_per_commit, args.batches)
    print(
        f"points/commit {args.points_per_commit}, in process: {per_batch} write commits per "
        f"10,000-point batch; a commit held the write lock p50 {_ms(holds, 0.5):.1f} ms, max "
        f"{_ms(holds, 1.0):.1f} ms; heartbeats of another study ({len(beats)}) p50 "
        f"{_ms(beats, 0.5):.1f} ms, p99 {_ms(beats, 0.99):.1f} ms, max {_ms(beats, 1.0):.1f} ms"
    )
    result = run(args.points_per_commit, args.batches)
    r = result
    print(
        f"points/commit {args.points_per_commit}: heartbeats of another study "
        f"({r['heartbeats']:.0f}) p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max "
        f"{r['max_ms']:.1f} ms; write-lock wait p50 {r['lock_p50_ms']:.1f} ms, p99 "
        f"{r['lock_p99_ms']:.1f} ms, max {r['lock_max_ms']:.1f} ms; a 10,000-point batch "
        f"took {r['batch_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
