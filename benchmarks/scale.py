"""Fast at 10,000 trials: the service side by side with plain Optuna in one run, by section.

``ask``: the latency of one ask of a study that already holds many finished trials.

* Ours: ``hpo serve`` (a subprocess on a fresh SQLite file, scheduler off) answers
  ``POST /studies/{id}/ask`` over loopback HTTP; every ask is followed by an (untimed) tell,
  as a client's loop does. Studies are seeded with finished trials by bulk inserts: TPE, random
  and grid at each of ``--sizes``, GP at ``--gp-trials``. The first ask of each study after the
  server starts is shown apart ("first": it loads the study's history into the sampler's cache).
* Optuna: the same ask-suggest (timed) and tell (untimed) with plain ``TPESampler`` /
  ``GPSampler`` (same options as ours) on an SQLite file (``RDBStorage``), and TPE also on a
  ``JournalStorage`` file (``--no-journal`` skips it) and, with ``--optuna-postgres URL``, on
  PostgreSQL (a throwaway database on the server of URL, dropped at the end). Optuna's
  studies are seeded the same way (rows and journal lines written directly; ``add_trials``
  takes ~35 ms a trial on SQLite).

Figures are medians over the asks after the first. Ratios: TPE ours ÷ Optuna at each size
(goal ≤ 0.5), GP ours ÷ Optuna (goal ≤ 1), random and grid at the largest size ÷ the
smallest (goal ≤ 2: flat).

    python benchmarks/scale.py ask                  # 1,000 and 10,000 trials, GP at 200; 1-2 min
    python benchmarks/scale.py ask --quick          # 300 and 1,000 trials, GP at 60
    python benchmarks/scale.py ask --sizes 1000,20000 --asks 20

``prune``: the latency of a report that brings a trial to ASHA's first rung (step 1), in a
study of many complete trials with ``--points`` steps each (min 1, η 3).

* Ours: a stopping-ASHA study on a fresh SQLite file and, with ``--postgres``, on a throwaway
  PostgreSQL database (trials and points bulk-inserted); a new
  trial is asked, then its report of steps 0 and 1 to ``POST /trials/{id}/metrics`` is timed
  over loopback HTTP (the answer carries the pruner's decision), then told if not pruned.
* Optuna: ``SuccessiveHalvingPruner`` (same rungs) on the same kind of database, seeded the
  same way (intermediate values and the rung values it records in system attributes); timed:
  ``trial.report`` of the same two values and ``trial.should_prune()`` (three commits; on
  SQLite in its default rollback journal, as Optuna leaves it; ours is one commit, in WAL).

Reports alternate ours and Optuna; figures are medians.

    python benchmarks/scale.py prune                # 1,000 and 10,000 trials x 100 steps
    python benchmarks/scale.py prune --postgres postgresql://postgres@127.0.0.1:5432/postgres
    python benchmarks/scale.py prune --sizes 1000 --points 1000

``read``: a notebook reads a finished study back with its learning curves: ``n`` complete
trials with ``--points`` steps each (bulk-inserted on both sides, as ``prune`` seeds them).
Ours: ``hpo.optuna``'s ``load_study(...).get_trials()`` (trials with their
``intermediate_values``, read a page of trials at a time through ``GET
/studies/{id}/metrics``), the client's ``metrics_dataframe`` (every point) and, for
comparison, a ``GET /trials/{id}/metrics`` per trial (how ``metrics_dataframe`` read them
before). Optuna: ``load_study(...).get_trials()`` on an SQLite file.

    python benchmarks/scale.py read                 # 1,000 and 10,000 trials x 20 points

``metrics``: metric ingestion from many trials of one study streaming at once.

* ``hpo serve`` (a subprocess, scheduler off) on a fresh SQLite file and, with ``--postgres``, on
  a throwaway PostgreSQL database. One ask/tell study with the median pruner; ``--complete``
  trials are first asked, reported and told (so the pruner has medians to compare with).
* ``--trials`` threads, split over ``--processes`` client processes (4; trials are processes
  of their own), each ask a trial and stream batches of ``--batch`` points (steps in
  order, metric ``loss`` and ``acc``) to ``POST /trials/{id}/metrics`` with the attempt's token
  and number, as a worker's reporter does, for ``--seconds``; a pruned trial is replaced by a
  new ask. Each trial reports as fast as it is answered, or with ``--interval`` once every
  so many seconds from a random offset (a worker's reporter flushes every 0.5 s). An ask
  answered 503 or 429 (its turn at the study did not come in time) is sent again after its
  Retry-After, as the Python client does, and counted. Figures: points stored per second (the
  server's count at the end over the streaming time), the latency of each report (its answer
  carries the should_stop decision), p50/p99 as the clients saw it and p99 as the server timed
  it (its ``hpo_report_duration_seconds`` histogram over the window, interpolated within a
  bucket; the clients' figure also holds their own waits: 64 threads on the same cores), the
  share of reports the server answered within 100 ms, and the asks retried. ``--timeline``
  counts the reports over 100 ms, and the asks, by the second they were sent in. ``--workers``
  runs the server as that many processes on its port (``hpo serve --workers``).

    python benchmarks/scale.py metrics --postgres postgresql://postgres@127.0.0.1:5432/postgres
    python benchmarks/scale.py metrics --interval 1 --batch 40   # paced: 64 × 40 points/s

``trial``: the whole round trip of one trial with the random sampler, what a client's loop
pays per trial when its objective is cheap.

* Ours: ``POST /studies/{id}/ask`` then ``POST /trials/{id}/tell`` over loopback HTTP, both
  timed, on a fresh SQLite file.
* Optuna: ``study.ask()``, the four ``suggest_*`` calls and ``study.tell()``, all timed, with
  ``RandomSampler`` on an SQLite file (``RDBStorage``, its default rollback journal) and on a
  ``JournalStorage`` file.

Trials alternate ours and Optuna, each study growing from empty; figures are medians and
means over ``--trials``. Ratio: ours ÷ Optuna on SQLite (the issue's goal: ≤ 0.2).

    python benchmarks/scale.py trial                # 300 trials each; ~10 s
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import multiprocessing
import random
import secrets
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, insert, make_url, text, update

from hpo.api.demo import served
from hpo.service.db import (
    MetricPoint,
    Study,
    Trial,
    TrialEvent,
    TrialParam,
    make_engine,
    upgrade_schema,
)
from hpo.service.db.models import utcnow
from hpo.service.samplers.grid import grid_points
from hpo.service.spec import StudySpec
from hpo.service.storage import Storage
from hpo.service.studies import StudyService

optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

API = "/api/v1"
KINDS = ("tpe", "random", "grid")  # asked at every size; GP at --gp-trials only
Params = dict[str, Any]

SPACE: dict[str, dict[str, Any]] = {
    "x": {"type": "float", "low": -5.0, "high": 5.0},
    "lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True},
    "n": {"type": "int", "low": 1, "high": 8},
    "opt": {"type": "categorical", "choices": ["sgd", "adam", "rmsprop"]},
}
# 101 × 200 = 20,200 points: room for 10,000 seeded trials and the asks after them.
GRID_SPACE: dict[str, dict[str, Any]] = {
    "x": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.01},
    "n": {"type": "int", "low": 1, "high": 200},
}
DISTS: dict[str, BaseDistribution] = {
    "x": FloatDistribution(-5.0, 5.0),
    "lr": FloatDistribution(1e-5, 1.0, log=True),
    "n": IntDistribution(1, 8),
    "opt": CategoricalDistribution(["sgd", "adam", "rmsprop"]),
}


def objective(p: Params) -> float:
    """A cheap function of every parameter kind, so the samplers have something to model."""
    value = (p["x"] - 1.0) ** 2 + 0.1 * (p.get("n", 3) - 3) ** 2
    if "lr" in p:
        value += (math.log10(p["lr"]) + 2.5) ** 2 + (0.5 if p["opt"] == "sgd" else 0.0)
    return value


def random_params(rng: random.Random) -> Params:
    return {
        "x": rng.uniform(-5.0, 5.0),
        "lr": 10 ** rng.uniform(-5.0, 0.0),
        "n": rng.randint(1, 8),
        "opt": rng.choice(["sgd", "adam", "rmsprop"]),
    }


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# --- ours: seeding and asking over HTTP -------------------------------------------------------


def seed_ours(
    storage: Storage,
    sampler: str,
    n: int,
    rng: random.Random,
    pruner: dict[str, Any] | None = None,
) -> int:
    """A running study named ``{sampler}-{n}`` with ``n`` complete trials, bulk-inserted."""
    grid = sampler == "grid"
    spec = StudySpec.model_validate(
        {
            "name": f"{sampler}-{n}",
            "objective": {"metric": "loss", "direction": "minimize"},
            "sampler": {"type": sampler, "seed": 0},
            "lease_s": 86_400,
            "space": GRID_SPACE if grid else SPACE,
            **({"pruner": pruner} if pruner else {}),
        }
    )
    study_id = StudyService(storage).create_study(spec).id
    points = grid_points(spec)[:n] if grid else [random_params(rng) for _ in range(n)]
    with storage.read() as s:
        first_id = (s.scalar(text("SELECT max(id) FROM trials")) or 0) + 1
    now = utcnow()
    done = now - timedelta(hours=1)  # a study's finished trials finished a while ago
    trials, params, events = [], [], []
    for i, p in enumerate(points):
        tid = first_id + i
        trials.append(
            {
                "id": tid,
                "study_id": study_id,
                "number": i,
                "state": "complete",
                "value": objective(p),
                "attempts": 1,
                "seq": i + 2,
                "created_at": now,
                "started_at": done - timedelta(seconds=1),
                "finished_at": done,
                "suggestion": {"sampler": sampler},
            }
        )
        params += [
            {"trial_id": tid, "name": k, "position": j, "value": v}
            for j, (k, v) in enumerate(p.items())
        ]
        events.append({"trial_id": tid, "state": "complete", "attempt": 1, "time": now})
    with storage.write() as s:
        for k in range(0, n, 5_000):
            s.execute(insert(Trial), trials[k : k + 5_000])
            s.execute(insert(TrialEvent), events[k : k + 5_000])
        for k in range(0, len(params), 20_000):
            s.execute(insert(TrialParam), params[k : k + 20_000])
        s.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(seq=n + 2, next_number=n, updated_at=now)
        )
        if s.get_bind().dialect.name == "postgresql":  # the sequence behind the ids we chose
            s.execute(
                text("SELECT setval(pg_get_serial_sequence('trials', 'id'), max(id)) FROM trials")
            )
    return study_id


@contextlib.contextmanager
def serving(work: Path, url: str) -> Iterator[httpx.Client]:
    """``hpo serve`` on the database at ``url`` (scheduler off, no rate limit) and a client."""
    env = {"HPO_DATABASE_URL": url, "HPO_SCHEDULER": "false", "HPO_LOG_LEVEL": "warning"}
    env["HPO_RATE_LIMIT_PER_S"] = "0"
    with served(work, env=env) as (base, token):
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
            yield client


def ask_ours(client: httpx.Client, study_id: int, asks: int) -> list[float]:
    """Seconds of each of ``asks`` asks (each then told, untimed)."""
    times = []
    for _ in range(asks):
        t0 = time.perf_counter()
        r = client.post(f"{API}/studies/{study_id}/ask")
        times.append(time.perf_counter() - t0)
        r.raise_for_status()
        trial = r.json()
        value = objective(trial["params"])
        client.post(
            f"{API}/trials/{trial['trial_id']}/tell", json={"value": value}
        ).raise_for_status()
    return times


# --- plain Optuna: seeding and asking ----------------------------------------------------------


def optuna_sampler(kind: str) -> optuna.samplers.BaseSampler:
    """Optuna's sampler with the options ours passes it (service/samplers/tpe.py, gp.py)."""
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=0, n_startup_trials=10)
    return optuna.samplers.TPESampler(
        seed=0, n_startup_trials=10, multivariate=True, constant_liar=True
    )


def seed_optuna_rdb(url: str, kind: str, n: int, rng: random.Random) -> optuna.Study:
    """A plain Optuna study on an RDB ``url`` with ``n`` complete trials (rows inserted)."""
    study = optuna.create_study(storage=url, sampler=optuna_sampler(kind))
    grow_optuna_rdb(url, study, n, rng)
    return study


def grow_optuna_rdb(url: str, study: optuna.Study, n: int, rng: random.Random) -> None:
    """Insert ``n`` more complete trials into an Optuna RDB study (its schema, its encoding)."""
    if n <= 0:
        return
    engine = create_engine(url)
    dist_json = {k: distribution_to_json(d) for k, d in DISTS.items()}
    with engine.begin() as c:
        first_id = (c.scalar(text("SELECT max(trial_id) FROM trials")) or 0) + 1
        first_number = c.scalar(
            text("SELECT count(*) FROM trials WHERE study_id = :s"), {"s": study._study_id}
        )
        first_param = (c.scalar(text("SELECT max(param_id) FROM trial_params")) or 0) + 1
        first_value = (c.scalar(text("SELECT max(trial_value_id) FROM trial_values")) or 0) + 1
        now = utcnow().replace(tzinfo=None)
        trials, params, values = [], [], []
        for i in range(n):
            tid = first_id + i
            p = random_params(rng)
            trials.append(
                {"id": tid, "number": first_number + i, "study": study._study_id, "now": now}
            )
            values.append({"id": first_value + i, "trial": tid, "value": objective(p)})
            for name, v in p.items():
                params.append(
                    {
                        "id": first_param + len(params),
                        "trial": tid,
                        "name": name,
                        "value": DISTS[name].to_internal_repr(v),
                        "dist": dist_json[name],
                    }
                )
        c.execute(
            text(
                "INSERT INTO trials (trial_id, number, study_id, state, datetime_start, "
                "datetime_complete) VALUES (:id, :number, :study, 'COMPLETE', :now, :now)"
            ),
            trials,
        )
        c.execute(
            text(
                "INSERT INTO trial_values (trial_value_id, trial_id, objective, value, value_type) "
                "VALUES (:id, :trial, 0, :value, 'FINITE')"
            ),
            values,
        )
        c.execute(
            text(
                "INSERT INTO trial_params (param_id, trial_id, param_name, param_value, "
                "distribution_json) VALUES (:id, :trial, :name, :value, :dist)"
            ),
            params,
        )
        if engine.dialect.name == "postgresql":  # the sequences behind the ids we chose
            for table, key in (
                ("trials", "trial_id"),
                ("trial_values", "trial_value_id"),
                ("trial_params", "param_id"),
            ):
                c.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', '{key}'), "
                        f"(SELECT max({key}) FROM {table}))"
                    )
                )
    engine.dispose()


def seed_optuna_journal(path: Path, n: int, rng: random.Random) -> optuna.Study:
    """A plain Optuna TPE study on a JournalStorage file with ``n`` complete trials (journal
    lines written as Optuna writes them, then replayed by Optuna)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    now = utcnow().isoformat()
    dist_json = {k: distribution_to_json(d) for k, d in DISTS.items()}
    lines = [{"op_code": 0, "worker_id": "seed", "study_name": "tpe", "directions": [1]}]
    for _ in range(n):
        p = random_params(rng)
        lines.append(
            {
                "op_code": 4,
                "worker_id": "seed",
                "study_id": 0,
                "datetime_start": now,
                "state": 1,
                "value": objective(p),
                "values": None,
                "datetime_complete": now,
                "distributions": dist_json,
                "params": {k: DISTS[k].to_internal_repr(v) for k, v in p.items()},
                "user_attrs": {},
                "system_attrs": {},
                "intermediate_values": {},
            }
        )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name="tpe", storage=storage, sampler=optuna_sampler("tpe"))


def suggest_optuna(trial: optuna.Trial) -> Params:
    """The four parameters of ``SPACE``, suggested through Optuna's trial."""
    return {
        "x": trial.suggest_float("x", -5.0, 5.0),
        "lr": trial.suggest_float("lr", 1e-5, 1.0, log=True),
        "n": trial.suggest_int("n", 1, 8),
        "opt": trial.suggest_categorical("opt", ["sgd", "adam", "rmsprop"]),
    }


def ask_optuna(study: optuna.Study, asks: int) -> list[float]:
    """Seconds of each of ``asks`` ask-and-suggest (each then told, untimed)."""
    times = []
    for _ in range(asks):
        t0 = time.perf_counter()
        trial = study.ask()
        p = suggest_optuna(trial)
        times.append(time.perf_counter() - t0)
        study.tell(trial, objective(p))
    return times


# --- the ask section ---------------------------------------------------------------------------


class Table:
    """Rows of (what, n, first ask, median, p90) in ms, and the medians by key."""

    def __init__(self) -> None:
        self.rows: list[str] = []
        self.median: dict[tuple[str, int], float] = {}

    def add(self, what: str, n: int, times: list[float]) -> None:
        rest = times[1:] or times
        med = statistics.median(rest)
        self.median[(what, n)] = med
        self.rows.append(
            f"| {what} | {n:,} | {times[0] * 1e3:,.1f} | {med * 1e3:,.1f} "
            f"| {pct(rest, 90) * 1e3:,.1f} | {len(rest)} |"
        )
        print(self.rows[-1], flush=True)


def run_ask(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(0)
    table = Table()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="hpo-scale-"))
        optuna_pg = None
        if args.optuna_postgres:  # a throwaway database on that server, dropped at the end
            optuna_pg, dropping = _pg_database(args.optuna_postgres)
            stack.enter_context(dropping)
        work = Path(tmp)
        t0 = time.perf_counter()
        url = f"sqlite:///{work / 'hpo.db'}"
        engine = make_engine(url)
        upgrade_schema(engine)
        storage = Storage(engine)
        ours = {(kind, n): seed_ours(storage, kind, n, rng) for n in sizes for kind in KINDS}
        ours["gp", args.gp_trials] = seed_ours(storage, "gp", args.gp_trials, rng)
        engine.dispose()
        # Plain Optuna: one study per size and storage, seeded the same way.
        theirs: dict[tuple[str, int], optuna.Study] = {}
        for n in sizes:
            theirs["SQLite", n] = seed_optuna_rdb(f"sqlite:///{work / f'o{n}.db'}", "tpe", n, rng)
            if args.journal:
                theirs["Journal", n] = seed_optuna_journal(work / f"j{n}.log", n, rng)
            if optuna_pg:
                theirs["PostgreSQL", n] = seed_optuna_rdb(optuna_pg, "tpe", n, rng)
        gp_url = f"sqlite:///{work / 'ogp.db'}"
        their_gp = seed_optuna_rdb(gp_url, "gp", args.gp_trials, rng)
        print(f"(seeded in {time.perf_counter() - t0:.1f} s)\n", flush=True)

        print("| what | finished trials | first ask ms | median ms | p90 ms | asks |")
        print("|---|---:|---:|---:|---:|---:|")
        with serving(work, url) as client:
            # Rounds alternate ours and Optuna so that both see the same machine load.
            for n in sizes:
                times: dict[str, list[float]] = {}
                for _ in range(args.asks + 1):
                    for kind in KINDS:
                        key = f"ours {kind} (HTTP)"
                        times.setdefault(key, []).extend(ask_ours(client, ours[kind, n], 1))
                    for where in ("SQLite", "Journal", "PostgreSQL"):
                        if (where, n) in theirs:
                            key = f"optuna tpe ({where})"
                            times.setdefault(key, []).extend(ask_optuna(theirs[where, n], 1))
                for key, ts in times.items():
                    table.add(key, n, ts)
            n = args.gp_trials
            times = {"ours gp (HTTP)": [], "optuna gp (SQLite)": []}
            for _ in range(args.gp_asks + 1):
                times["ours gp (HTTP)"] += ask_ours(client, ours["gp", n], 1)
                times["optuna gp (SQLite)"] += ask_optuna(their_gp, 1)
            for key, ts in times.items():
                table.add(key, n, ts)

    m = table.median
    print("\nratios of medians:")
    for n in sizes:
        for where in ("SQLite", "Journal", "PostgreSQL"):
            if (f"optuna tpe ({where})", n) in m:
                r = m["ours tpe (HTTP)", n] / m[f"optuna tpe ({where})", n]
                goal = "  (goal ≤ 0.5)" if where == "SQLite" else ""
                print(f"  TPE at {n:,}: ours / Optuna on {where} = {r:.2f}{goal}")
    n = args.gp_trials
    g = m["ours gp (HTTP)", n] / m["optuna gp (SQLite)", n]
    print(f"  GP at {n}: ours / Optuna on SQLite = {g:.2f}  (goal ≤ 1)")
    lo, hi = sizes[0], sizes[-1]
    for kind in KINDS:
        r = m[f"ours {kind} (HTTP)", hi] / m[f"ours {kind} (HTTP)", lo]
        goal = "  (goal ≤ 2)" if kind != "tpe" else ""
        print(f"  ours {kind} at {hi:,} / at {lo:,} = {r:.2f}{goal}")


# --- the trial section -------------------------------------------------------------------------


def trial_ours(client: httpx.Client, study_id: int) -> float:
    """Seconds of one ask and its tell over HTTP."""
    t0 = time.perf_counter()
    r = client.post(f"{API}/studies/{study_id}/ask")
    r.raise_for_status()
    trial = r.json()
    told = client.post(
        f"{API}/trials/{trial['trial_id']}/tell", json={"value": objective(trial["params"])}
    )
    told.raise_for_status()
    return time.perf_counter() - t0


def trial_optuna(study: optuna.Study) -> float:
    """Seconds of one ask, its suggestions and its tell in plain Optuna."""
    t0 = time.perf_counter()
    trial = study.ask()
    study.tell(trial, objective(suggest_optuna(trial)))
    return time.perf_counter() - t0


# --- the trial section's parts (--parts): where one trial's time goes -------------------------

# Two routes of the shape of ours (an ask answered with params, a tell with a small body), with
# none of our middleware, authentication, pools or database: what two POSTs cost FastAPI and
# uvicorn, and the client, on this machine.
BARE_APP = """
from fastapi import FastAPI

app = FastAPI()


@app.post("/ask", status_code=201)
def ask() -> dict:
    return {"trial_id": 1, "number": 0, "params": {"x": 0.5, "lr": 0.01, "n": 3, "opt": "adam"}}


@app.post("/tell")
def tell(body: dict) -> dict:
    return {"id": 1, "number": 0, "state": "complete", "value": body.get("value")}
"""


@contextlib.contextmanager
def bare_server(work: Path) -> Iterator[httpx.Client]:
    """:data:`BARE_APP` under uvicorn in a subprocess, and a client of it."""
    import socket
    import subprocess
    import sys

    (work / "bare_app.py").write_text(BARE_APP)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(work), "bare_app:app"]
    proc = subprocess.Popen([*cmd, "--port", str(port), "--log-level", "warning"])
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.post("/ask").raise_for_status()
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.1)
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def trial_bare(client: httpx.Client) -> float:
    """Seconds of an ask and a tell to :data:`BARE_APP`."""
    t0 = time.perf_counter()
    r = client.post("/ask")
    r.raise_for_status()
    client.post("/tell", json={"value": objective(SPACE_MID)}).raise_for_status()
    return time.perf_counter() - t0


SPACE_MID: Params = {"x": 0.5, "lr": 0.01, "n": 3, "opt": "adam"}


def trial_service(service: StudyService, study_id: int) -> float:
    """Seconds of ``StudyService.ask`` and ``tell`` in this process: our whole ask and tell
    (the fenced state machine, its events and sequences) without HTTP."""
    t0 = time.perf_counter()
    trial = service.ask(study_id)
    service.tell(trial.id, value=objective(trial.params))
    return time.perf_counter() - t0


# One transaction of :class:`PlainStatements`: a function that runs one statement (named
# parameters) and returns its rows' cursor.
Execute = Any


@contextlib.contextmanager
def sqlite3_transaction(db: Any, *, write: bool) -> Iterator[Execute]:
    """A transaction on a ``sqlite3`` connection in autocommit mode (``BEGIN IMMEDIATE`` for a
    write, as our engine begins one)."""

    def run(sql: str, params: Any = ()) -> Any:
        many = isinstance(params, list)
        return db.executemany(sql, params) if many else db.execute(sql, params)

    db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield run
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@contextlib.contextmanager
def core_transaction(engines: tuple[Any, Any], *, write: bool) -> Iterator[Execute]:
    """A transaction on our engine (``make_engine``: its write transactions begin
    ``IMMEDIATE``) or its read-only form (deferred), ``engines`` (the engine, the read-only
    one) as the storage keeps them; statements run through SQLAlchemy Core."""
    with engines[0 if write else 1].begin() as conn:
        yield lambda sql, params=None: conn.execute(text(sql), params or {})


class PlainStatements:
    """The statements our ask and tell send SQLite (the same transactions, in the same order,
    writing the same rows and values; the tell's read names the columns it uses where the ORM
    reads every column of both rows), with no ORM and no checks: what the database costs a
    trial here, through the ``sqlite3`` module or through SQLAlchemy Core (``transaction``:
    :func:`sqlite3_transaction` or :func:`core_transaction`, bound to a connection or
    engines). An ask reads in one
    transaction (the study, a waiting trial) and writes in a second (the study's row read
    again, its counters, the trial, its parameters, its token's hash, its first event); a
    tell reads the trial, its study and its parameters and writes the study's counters, an
    event and the trial, in one. ``study_id`` is a study the service made on that file."""

    STUDY = (
        "SELECT id, name, spec, state, next_number, seq, curve_seq, state_reason, created_at, "
        "updated_at, started_at, finished_at FROM studies WHERE id = :study"
    )
    WAITING = (
        "SELECT id FROM trials WHERE study_id = :study AND state = 'waiting' ORDER BY number "
        "LIMIT 1"
    )
    COUNTERS = (
        "UPDATE studies SET seq = :seq, curve_seq = :seq, updated_at = :now WHERE id = :study"
    )
    NEW_TRIAL = (
        "INSERT INTO trials (study_id, number, state, attempts, seq, curve_seq, "
        "lease_expires_at, created_at, started_at, suggestion, infra_failures, worker_seconds, "
        "attempt_started_at, steps_copied) VALUES (:study, :number, 'running', 1, :seq, :seq, "
        ":now, :now, :now, :suggestion, 0, 0.0, :now, 0) RETURNING id"
    )
    PARAM = (
        "INSERT INTO trial_params (trial_id, name, position, value) "
        "VALUES (:trial, :name, :position, :value)"
    )
    EVENT = (
        "INSERT INTO trial_events (trial_id, time, state, attempt, detail) "
        "VALUES (:trial, :now, :state, 1, :detail)"
    )
    LOCK = (
        "SELECT studies.seq, studies.curve_seq, studies.spec, trials.state, trials.attempts, "
        "trials.attempt_token_hash FROM studies JOIN trials ON trials.study_id = studies.id "
        "WHERE trials.id = :trial"
    )
    FINISH = (
        "UPDATE trials SET state = 'complete', value = :value, seq = :seq, curve_seq = :seq, "
        "lease_expires_at = NULL, finished_at = :now, worker_seconds = 0.001, "
        "attempt_started_at = NULL WHERE id = :trial"
    )

    def __init__(self, transaction: Callable[..., Any], study_id: int) -> None:
        self.transaction = transaction
        self.study = study_id

    def trial(self, rng: random.Random) -> float:
        """Seconds of one ask and its tell."""
        import hashlib

        sid = {"study": self.study}
        t0 = time.perf_counter()
        with self.transaction(write=False) as run:
            run(self.STUDY, sid).fetchone()
            run(self.WAITING, sid).fetchone()
        params = {
            "x": rng.uniform(-5.0, 5.0),
            "lr": math.exp(rng.uniform(math.log(1e-5), 0.0)),
            "n": rng.randint(1, 8),
            "opt": rng.choice(["sgd", "adam", "rmsprop"]),
        }
        now = str(utcnow().replace(tzinfo=None))  # as the ORM writes it
        with self.transaction(write=True) as run:
            row = run(self.STUDY, sid).fetchone()
            number, seq = row[4], max(row[5], row[6]) + 1
            run(
                "UPDATE studies SET next_number = :next, seq = :seq, curve_seq = :seq, "
                "updated_at = :now WHERE id = :study",
                {**sid, "next": number + 1, "seq": seq, "now": now},
            )
            suggestion = json.dumps({"sampler": "random"})
            new = {**sid, "number": number, "seq": seq, "now": now, "suggestion": suggestion}
            (trial_id,) = run(self.NEW_TRIAL, new).fetchone()
            run(
                self.PARAM,
                [
                    {"trial": trial_id, "name": k, "position": i, "value": json.dumps(v)}
                    for i, (k, v) in enumerate(params.items())
                ],
            )
            token = f"hpo_att.{trial_id}.1.{secrets.token_urlsafe(32)}"
            run(
                "UPDATE trials SET attempt_token_hash = :hash WHERE id = :trial",
                {"hash": hashlib.sha256(token.encode()).hexdigest(), "trial": trial_id},
            )
            event = {"trial": trial_id, "now": now, "state": "running"}
            run(self.EVENT, {**event, "detail": "suggested by random"})
        value = objective(params)
        now = str(utcnow().replace(tzinfo=None))  # as the ORM writes it
        with self.transaction(write=True) as run:
            row = run(self.LOCK, {"trial": trial_id}).fetchone()
            run(
                "SELECT name, value FROM trial_params WHERE trial_id = :trial ORDER BY position",
                {"trial": trial_id},
            ).fetchall()
            seq = max(row[0], row[1]) + 1
            run(self.COUNTERS, {**sid, "seq": seq, "now": now})
            run(self.EVENT, {"trial": trial_id, "now": now, "state": "complete", "detail": None})
            run(self.FINISH, {"trial": trial_id, "value": value, "seq": seq, "now": now})
        return time.perf_counter() - t0


BARE = "two POSTs to a bare FastAPI app"
SERVICE = "StudyService.ask + tell in process"
PLAIN = "the same statements by sqlite3"
CORE = "the same statements by SQLAlchemy Core"


@contextlib.contextmanager
def trial_parts(work: Path, spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The parts of one trial, each a function timing one (``--parts``): the bare HTTP round
    trips (:data:`BARE_APP`), our service without HTTP, and its statements without the ORM
    (through ``sqlite3`` and through SQLAlchemy Core), on an SQLite file of their own."""
    import sqlite3

    rng = random.Random(0)
    path = work / "parts.db"
    with bare_server(work) as bare:
        engine = make_engine(f"sqlite:///{path}")
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in ("synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=3000"):
            db.execute(f"PRAGMA {pragma}")  # as make_engine sets them
        try:
            upgrade_schema(engine)
            service = StudyService(Storage(engine))

            def study(name: str) -> int:
                return service.create_study(StudySpec.model_validate({**spec, "name": name})).id

            service_id = study("service")
            by_sqlite3 = PlainStatements(
                functools.partial(sqlite3_transaction, db), study("sqlite3")
            )
            engines = (engine, engine.execution_options(readonly=True))
            by_core = PlainStatements(functools.partial(core_transaction, engines), study("core"))
            yield {
                BARE: lambda: trial_bare(bare),
                SERVICE: lambda: trial_service(service, service_id),
                PLAIN: lambda: by_sqlite3.trial(rng),
                CORE: lambda: by_core.trial(rng),
            }
        finally:
            db.close()
            engine.dispose()


def run_trial(args: argparse.Namespace) -> None:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="hpo-scale-") as tmp:
        work = Path(tmp)
        url = f"sqlite:///{work / 'hpo.db'}"  # the server makes its schema
        theirs = {
            "SQLite": optuna.create_study(
                storage=f"sqlite:///{work / 'optuna.db'}",
                sampler=optuna.samplers.RandomSampler(seed=0),
            ),
            "Journal": optuna.create_study(
                storage=JournalStorage(JournalFileBackend(str(work / "optuna.log"))),
                sampler=optuna.samplers.RandomSampler(seed=0),
            ),
        }
        spec = {
            "name": "trial-loop",
            "objective": {"metric": "loss", "direction": "minimize"},
            "sampler": {"type": "random", "seed": 0},
            "space": SPACE,
        }
        times: dict[str, list[float]] = {"ours random (HTTP)": []}
        with serving(work, url) as client, contextlib.ExitStack() as stack:
            created = client.post(f"{API}/studies", json=spec)
            created.raise_for_status()
            study_id = created.json()["id"]
            parts = stack.enter_context(trial_parts(work, spec)) if args.parts else {}
            for _ in range(args.trials):  # alternating, so all see the same machine load
                times["ours random (HTTP)"].append(trial_ours(client, study_id))
                for where, study in theirs.items():
                    times.setdefault(f"optuna random ({where})", []).append(trial_optuna(study))
                for what, run in parts.items():
                    times.setdefault(what, []).append(run())
    print(f"{args.trials} trials each, every one asked and told; ms per trial\n")
    print("| what | median | mean | p90 |\n|---|---:|---:|---:|")
    for what, ts in times.items():
        print(
            f"| {what} | {statistics.median(ts) * 1e3:.2f} | {statistics.fmean(ts) * 1e3:.2f} "
            f"| {pct(ts, 90) * 1e3:.2f} |"
        )
    ours = times["ours random (HTTP)"]
    print("\nratios, ours / Optuna:")
    for where in theirs:
        ts = times[f"optuna random ({where})"]
        goal = "  (goal ≤ 0.2)" if where == "SQLite" else ""
        print(
            f"  on {where}: median {statistics.median(ours) / statistics.median(ts):.2f}, "
            f"mean {statistics.fmean(ours) / statistics.fmean(ts):.2f}{goal}"
        )
    if args.parts:
        med = {what: statistics.median(ts) for what, ts in times.items()}
        optuna_ms = med["optuna random (SQLite)"]
        goal_ms = 0.2 * optuna_ms
        print(f"\n0.2 of Optuna on SQLite: {goal_ms * 1e3:.2f} ms a trial")
        for sql in (PLAIN, CORE):
            floor = med[BARE] + med[sql]
            print(f"{BARE} + {sql}: {floor * 1e3:.2f} ms, {floor / optuna_ms:.2f} of Optuna")
        api = med["ours random (HTTP)"] - med[BARE] - med[SERVICE]
        print(
            f"ours over HTTP, less the bare HTTP and the service in process (our API around "
            f"it): {api * 1e3:.2f} ms"
        )


# --- the prune section -------------------------------------------------------------------------

ASHA = {"type": "asha", "min_steps": 1, "reduction_factor": 3}


def _rungs(points: int) -> list[int]:
    """ASHA's rungs (min 1, η 3) below ``points`` steps: 1, 3, 9, 27, ..."""
    rungs, step = [], 1
    while step < points:
        rungs.append(step)
        step *= 3
    return rungs


def _seed_curve(rng: random.Random, points: int) -> list[float]:
    """A decaying loss curve of ``points`` steps, its level drawn at random."""
    level = rng.uniform(0.0, 1.0)
    return [level + 1.0 / (1 + step) for step in range(points)]


def seed_ours_curves(storage: Storage, n: int, points: int, rng: random.Random) -> int:
    """A study with stopping ASHA whose ``n`` complete trials reported ``points`` steps each."""
    study_id = seed_ours(storage, "random", n, rng, pruner=ASHA)
    with storage.read() as s:
        ids = s.scalars(text(f"SELECT id FROM trials WHERE study_id = {study_id}")).all()
    now = utcnow()
    rows = []
    with storage.write() as s:
        for tid in ids:
            curve = _seed_curve(rng, points)
            rows += [
                {
                    "trial_id": tid,
                    "study_id": study_id,
                    "attempt": 1,
                    "step": step,
                    "name": "loss",
                    "value": v,
                    "time": now,
                }
                for step, v in enumerate(curve)
            ]
            if len(rows) >= 50_000:
                s.execute(insert(MetricPoint), rows)
                rows = []
        if rows:
            s.execute(insert(MetricPoint), rows)
    return study_id


def seed_optuna_curves(url: str, n: int, points: int, rng: random.Random) -> optuna.Study:
    """Plain Optuna with its SuccessiveHalvingPruner (min 1, η 3): ``n`` complete trials with
    ``points`` intermediate values each and the rung values the pruner records."""
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    sampler = optuna.samplers.RandomSampler(seed=0)  # ours asks the random sampler too
    study = optuna.create_study(storage=url, sampler=sampler, pruner=pruner)
    grow_optuna_rdb(url, study, n, rng)
    engine = create_engine(url)
    with engine.begin() as c:
        ids = c.scalars(
            text("SELECT trial_id FROM trials WHERE study_id = :s"), {"s": study._study_id}
        ).all()
        values, attrs = [], []
        for tid in ids:
            curve = _seed_curve(rng, points)
            values += [{"trial": tid, "step": step, "value": v} for step, v in enumerate(curve)]
            attrs += [
                {"trial": tid, "key": f"completed_rung_{k}", "value": json.dumps(curve[rung])}
                for k, rung in enumerate(_rungs(points))
            ]
        c.execute(
            text(
                "INSERT INTO trial_intermediate_values (trial_id, step, intermediate_value, "
                "intermediate_value_type) VALUES (:trial, :step, :value, 'FINITE')"
            ),
            values,
        )
        c.execute(
            text(
                "INSERT INTO trial_system_attributes (trial_id, key, value_json) "
                "VALUES (:trial, :key, :value)"
            ),
            attrs,
        )
    engine.dispose()
    return study


def prune_ours(client: httpx.Client, study_id: int, curve: list[float]) -> float:
    """Seconds of one report of a new trial's ``curve`` (steps 0 and 1: the first rung; its
    answer carries the pruner's decision); the trial is then told, untimed, unless pruned."""
    t = client.post(f"{API}/studies/{study_id}/ask")
    t.raise_for_status()
    trial = t.json()
    points = [{"step": step, "name": "loss", "value": v} for step, v in enumerate(curve)]
    t0 = time.perf_counter()
    r = client.post(
        f"{API}/trials/{trial['trial_id']}/metrics",
        json={"points": points, "attempt": trial["attempt"]},
        headers={"Authorization": f"Bearer {trial['attempt_token']}"},
    )
    took = time.perf_counter() - t0
    r.raise_for_status()
    if not r.json()["should_stop"]:
        client.post(
            f"{API}/trials/{trial['trial_id']}/tell", json={"value": curve[-1]}
        ).raise_for_status()
    return took


def prune_optuna(study: optuna.Study, curve: list[float]) -> float:
    """Seconds of Optuna's report of the same ``curve`` and ``should_prune``; then told."""
    trial = study.ask()
    trial.suggest_float("x", -5.0, 5.0)
    t0 = time.perf_counter()
    for step, v in enumerate(curve):
        trial.report(v, step)
    pruned = trial.should_prune()
    took = time.perf_counter() - t0
    if pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, curve[-1])
    return took


def run_prune(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(0)
    print(
        f"A new trial reports steps 0 and 1 (ASHA's first rung) in a study of n complete "
        f"trials with {args.points} steps each; {args.reports} reports per size\n"
    )
    print(
        "| database | finished trials | points stored | ours p50 ms | Optuna p50 ms "
        "| ours ÷ Optuna |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for where, admin in _databases(args):
        with (
            tempfile.TemporaryDirectory(prefix="hpo-scale-") as tmp,
            contextlib.ExitStack() as on_exit,
        ):
            work = Path(tmp)
            if admin is None:
                url, optuna_url = f"sqlite:///{work / 'hpo.db'}", f"sqlite:///{work / 'o.db'}"
            else:  # a throwaway database each (both schemas have a table "trials")
                url, drop = _pg_database(admin)
                on_exit.enter_context(drop)
                optuna_url, drop = _pg_database(admin)
                on_exit.enter_context(drop)
            engine = make_engine(url)
            upgrade_schema(engine)
            storage = Storage(engine)
            ours = {n: seed_ours_curves(storage, n, args.points, rng) for n in sizes}
            engine.dispose()
            theirs = {n: seed_optuna_curves(optuna_url, n, args.points, rng) for n in sizes}
            if admin is not None:  # statistics for both planners, as autovacuum would give
                for analyzed in (url, optuna_url):
                    engine = create_engine(analyzed, isolation_level="AUTOCOMMIT")
                    with engine.connect() as conn:
                        conn.execute(text("ANALYZE"))
                    engine.dispose()
            with serving(work, url) as client:
                for n in sizes:
                    mine, optunas = [], []
                    for _ in range(args.reports):  # alternating: both see the same load
                        curve = _seed_curve(rng, 2)  # the same values on both sides
                        mine.append(prune_ours(client, ours[n], curve))
                        optunas.append(prune_optuna(theirs[n], curve))
                    a, b = statistics.median(mine) * 1e3, statistics.median(optunas) * 1e3
                    print(
                        f"| {where} | {n:,} | {n * args.points:,} | {a:,.1f} | {b:,.1f} "
                        f"| {a / b:.2f} |",
                        flush=True,
                    )


# --- the read section --------------------------------------------------------------------------


def read_ours(base: str, token: str, name: str, study_id: int) -> dict[str, float]:
    """Seconds to read the study back with its curves: Optuna's way through ``hpo.optuna``
    (``get_trials``: trials with their intermediate values), the client's
    ``metrics_dataframe`` (every point), and a request per trial (``Study.metrics``, as
    ``metrics_dataframe`` read them before ``GET /studies/{id}/metrics``)."""
    import hpo.optuna as hpo_optuna
    from hpo.api.client import Client

    out = {}
    t0 = time.perf_counter()
    trials = hpo_optuna.load_study(study_name=name, storage=base).get_trials()
    out["ours: hpo.optuna get_trials"] = time.perf_counter() - t0
    assert all(t.intermediate_values for t in trials)
    study = Client(base, token).study(study_id)
    t0 = time.perf_counter()
    study.metrics_dataframe()
    out["ours: metrics_dataframe"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in study.trials():
        study.metrics(t.id)
    out["ours: a request per trial"] = time.perf_counter() - t0
    return out


def read_optuna(url: str, name: str) -> float:
    """Seconds of plain Optuna's ``load_study(...).get_trials()`` on its storage."""
    t0 = time.perf_counter()
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    took = time.perf_counter() - t0
    assert all(t.intermediate_values for t in trials)
    return took


def run_read(args: argparse.Namespace) -> None:
    """A notebook reads a finished study back with its learning curves."""
    import os

    rng = random.Random(0)
    print(
        f"Reading a study of n complete trials with {args.points} points each back, with "
        f"its curves; median of {args.reads} reads, seconds\n"
    )
    print(
        "| finished trials | points | hpo.optuna get_trials | metrics_dataframe "
        "| a request per trial | Optuna get_trials (SQLite) | hpo.optuna ÷ Optuna |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="hpo-scale-") as tmp:
            work = Path(tmp)
            url, optuna_url = f"sqlite:///{work / 'hpo.db'}", f"sqlite:///{work / 'o.db'}"
            engine = make_engine(url)
            upgrade_schema(engine)
            storage = Storage(engine)
            study_id = seed_ours_curves(storage, n, args.points, rng)
            with storage.write() as s:  # as the reports would have left them
                s.execute(
                    update(Trial)
                    .where(Trial.study_id == study_id)
                    .values(last_step=args.points - 1)
                )
            engine.dispose()
            theirs = seed_optuna_curves(optuna_url, n, args.points, rng)
            env = {"HPO_DATABASE_URL": url, "HPO_SCHEDULER": "false", "HPO_LOG_LEVEL": "warning"}
            env["HPO_RATE_LIMIT_PER_S"] = "0"
            times: dict[str, list[float]] = {}
            with served(work, env=env) as (base, token):
                os.environ["HPO_TOKEN"] = token
                for _ in range(args.reads):  # alternating: both see the same load
                    for what, took in read_ours(base, token, f"random-{n}", study_id).items():
                        times.setdefault(what, []).append(took)
                    took = read_optuna(optuna_url, theirs.study_name)
                    times.setdefault("optuna", []).append(took)
            med = {what: statistics.median(ts) for what, ts in times.items()}
            mine, frame = med["ours: hpo.optuna get_trials"], med["ours: metrics_dataframe"]
            print(
                f"| {n:,} | {n * args.points:,} | {mine:.2f} | {frame:.2f} "
                f"| {med['ours: a request per trial']:.2f} | {med['optuna']:.2f} "
                f"| {mine / med['optuna']:.2f} |",
                flush=True,
            )


# --- the metrics section -----------------------------------------------------------------------


def _metrics_spec(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "objective": {"metric": "loss", "direction": "minimize"},
        "sampler": {"type": "random", "seed": 0},
        "space": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
        "pruner": {"type": "median", "n_startup_trials": 5, "min_steps": 1},
    }


def _curve(x: float, step: int) -> float:
    """The loss of a trial with quality ``x`` at ``step``: decays towards x."""
    return x + 1.0 / (1 + step)


def _streams(
    n: int,
    base: str,
    headers: dict[str, str],
    study_id: int,
    batch: int,
    interval: float,
    stop_at: float,
) -> tuple[list[tuple[str, float, float]], list[str]]:
    """``n`` streaming workers on threads of this (client) process, until ``stop_at``
    (``time.monotonic``); their requests (``"report"`` or ``"ask"``, when it was answered, its
    latency) and errors."""
    reports: list[tuple[str, float, float]] = []
    errors: list[str] = []
    args = (base, headers, study_id, batch, interval, stop_at, reports, errors)
    threads = [threading.Thread(target=_stream, args=args) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return reports, errors


def _stream(
    base: str,
    headers: dict[str, str],
    study_id: int,
    batch: int,
    interval: float,
    stop_at: float,
    reports: list[tuple[str, float, float]],
    errors: list[str],
) -> None:
    """One streaming worker: ask, report batches until pruned or time is up (``stop_at``,
    ``time.monotonic``), ask again.
    Paced workers start at a random offset within their interval: trials' reporters do not
    flush in step (started together, 64 reports arrived in one burst every interval)."""
    if interval:
        time.sleep(random.uniform(0, interval))
    with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            asked = client.post(f"{API}/studies/{study_id}/ask")
            reports.append(("ask", time.monotonic(), time.perf_counter() - t0))
            if asked.status_code in (429, 503):  # busy: retry after Retry-After, as the client
                errors.append(f"retried: ask {asked.status_code}: {asked.text[:200]}")
                time.sleep(float(asked.headers.get("Retry-After", "1")))
                continue
            if asked.status_code != 201:
                errors.append(f"ask {asked.status_code}: {asked.text[:200]}")
                return
            t = asked.json()
            x, step = t["params"]["x"], 0
            auth = {"Authorization": f"Bearer {t['attempt_token']}"}
            while time.monotonic() < stop_at:
                due = time.monotonic() + interval
                points = []
                for _ in range(batch // 2):
                    loss = _curve(x, step)
                    points += [
                        {"step": step, "name": "loss", "value": loss},
                        {"step": step, "name": "acc", "value": 1 - loss / 3},
                    ]
                    step += 1
                t0 = time.perf_counter()
                r = client.post(
                    f"{API}/trials/{t['trial_id']}/metrics",
                    json={"points": points, "attempt": t["attempt"]},
                    headers=auth,
                )
                reports.append(("report", time.monotonic(), time.perf_counter() - t0))
                if r.status_code != 200:
                    errors.append(f"report {r.status_code}: {r.text[:200]}")
                    return
                if r.json()["should_stop"]:
                    break
                time.sleep(max(0.0, due - time.monotonic()))


def _report_buckets(client: httpx.Client) -> dict[float, float]:
    """The server's histogram of its reports' answer times (``GET /metrics``): how many were
    answered within each bucket's bound, in seconds (cumulative)."""
    r = client.get("/metrics")
    r.raise_for_status()
    return {
        float(sample.labels["le"]): sample.value
        for family in text_string_to_metric_families(r.text)
        for sample in family.samples
        if sample.name == "hpo_report_duration_seconds_bucket"
    }


def _bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """The ``q`` quantile of a cumulative histogram, interpolated within its bucket as
    Prometheus's ``histogram_quantile`` does (the highest finite bound if it lies above)."""
    bounds = sorted(buckets)
    total = buckets.get(math.inf, 0)  # no histogram: a server from before it (0 reports)
    if not total:
        return math.nan
    rank, low, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return low
            return low + (bound - low) * (rank - below) / max(buckets[bound] - below, 1e-9)
        low, below = bound, buckets[bound]
    return low


def _stored_points(url: str, study_id: int) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                text("SELECT count(*) FROM metric_points WHERE study_id = :s"), {"s": study_id}
            ).scalar_one()
    finally:
        engine.dispose()


def _multixacts(url: str) -> int | None:
    """PostgreSQL's MultiXact counter (the whole server's: run nothing else beside it), or
    None on SQLite. Shared row locks held by several transactions at once make them."""
    engine = make_engine(url)
    try:
        if engine.dialect.name != "postgresql":
            return None
        with engine.connect() as conn:
            return conn.execute(text("SELECT mxid_age('1'::xid)")).scalar_one()
    finally:
        engine.dispose()


def metrics_once(url: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """One run of the metrics section on the database at ``url``; its figures."""
    env = {"HPO_DATABASE_URL": url, "HPO_SCHEDULER": "false", "HPO_LOG_LEVEL": "warning"}
    env["HPO_RATE_LIMIT_PER_S"] = "0"
    env["HPO_WORKERS"] = str(args.workers)
    with served(work, env=env) as (base, token):
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
            r = client.post(f"{API}/studies", json=_metrics_spec("metrics"))
            r.raise_for_status()
            study_id = r.json()["id"]
            for _ in range(args.complete):  # finished trials with curves: the medians
                t = client.post(f"{API}/studies/{study_id}/ask").json()
                x = t["params"]["x"]
                pts = [{"step": s, "name": "loss", "value": _curve(x, s)} for s in range(1000)]
                client.post(f"{API}/trials/{t['trial_id']}/metrics", json={"points": pts})
                client.post(f"{API}/trials/{t['trial_id']}/tell", json={"value": x})
            seen_before = _report_buckets(client)
        before = _stored_points(url, study_id)
        multixacts = _multixacts(url)
        shares = [args.trials // args.processes] * args.processes
        for i in range(args.trials % args.processes):
            shares[i] += 1
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.processes, mp_context=ctx) as pool:
            # Every client process up (this script imported) before the window starts.
            list(pool.map(time.sleep, [0.5] * args.processes))
            t0 = time.monotonic()
            stop_at = t0 + args.seconds  # CLOCK_MONOTONIC: one clock for the processes
            parts = [
                pool.submit(
                    _streams, n, base, headers, study_id, args.batch, args.interval, stop_at
                )
                for n in shares
                if n
            ]
            timed, errors = [], []
            for part in parts:
                answered, err = part.result()
                timed += answered
                errors += err
        with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
            seen = _report_buckets(client)
    served_buckets = {le: n - seen_before.get(le, 0) for le, n in seen.items()}
    latencies = [dt for kind, _, dt in timed if kind == "report"]
    if args.timeline:
        slow: dict[int, int] = {}
        asks: dict[int, int] = {}
        for kind, at, dt in timed:
            second = int(at - dt - t0)
            if kind == "ask":
                asks[second] = asks.get(second, 0) + 1
            elif dt > 0.1:
                slow[second] = slow.get(second, 0) + 1
        for what, counts in (("reports over 100 ms", slow), ("asks", asks)):
            print(
                f"  {what}, by second they were sent in: "
                + (", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"),
                flush=True,
            )
    stored = _stored_points(url, study_id) - before
    if multixacts is not None:
        multixacts = _multixacts(url) - multixacts
    retried = [e for e in errors if e.startswith("retried: ")]
    errors = [e for e in errors if not e.startswith("retried: ")]
    if retried:
        print(f"  {len(retried)} asks retried after 503/429, first: {retried[0][9:]}", flush=True)
    if errors:
        print(f"  {len(errors)} errors, first: {errors[0]}", flush=True)
    return {
        # over the window, not until the last stream ended: a stream asleep before an ask's
        # retry at the window's end would otherwise count as time spent storing nothing
        "points_s": stored / args.seconds,
        "reports": len(latencies),
        "p50_ms": pct(latencies, 50) * 1e3,
        "p99_ms": pct(latencies, 99) * 1e3,
        "server_p99_ms": _bucket_quantile(served_buckets, 0.99) * 1e3,
        "server_within_100ms": served_buckets.get(0.1, math.nan)
        / max(1, served_buckets.get(math.inf, 0)),
        "retried": len(retried),
        "errors": len(errors),
        "multixacts": math.nan if multixacts is None else multixacts / max(1, len(latencies)),
    }


def run_metrics(args: argparse.Namespace) -> None:
    pace = f"one every {args.interval} s" if args.interval else "as fast as answered"
    print(
        f"{args.trials} streaming trials, {args.batch} points a report ({pace}), {args.seconds} s, "
        f"{args.workers} server process(es)\n"
    )
    print(
        "| database | points/s | reports | report p50 ms | report p99 ms "
        "| server p99 ms | server ≤ 100 ms | asks retried (503) | errors | MultiXacts a report |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for where, admin in _databases(args):
        with tempfile.TemporaryDirectory(prefix="hpo-scale-") as tmp:
            work = Path(tmp)
            if admin is None:
                url = f"sqlite:///{work / 'hpo.db'}"
                drop = contextlib.nullcontext()
            else:
                url, drop = _pg_database(admin)
            with drop:
                engine = make_engine(url)
                upgrade_schema(engine)
                engine.dispose()
                f = metrics_once(url, work, args)
            print(
                f"| {where} | {f['points_s']:,.0f} | {f['reports']:,} | {f['p50_ms']:,.1f} "
                f"| {f['p99_ms']:,.1f} | {f['server_p99_ms']:,.0f} "
                f"| {f['server_within_100ms']:.1%} | {f['retried']} | {f['errors']} "
                f"| {f['multixacts']:.2f} |",
                flush=True,
            )


def _databases(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """The databases a section runs on: (its name, the PostgreSQL admin URL or None for a
    fresh SQLite file), from ``--no-sqlite`` and ``--postgres``."""
    targets: list[tuple[str, str | None]] = [] if args.no_sqlite else [("SQLite", None)]
    if args.postgres:
        targets.append(("PostgreSQL", args.postgres))
    return targets


def _pg_database(admin_url: str) -> tuple[str, contextlib.AbstractContextManager]:
    """A throwaway database on the server of ``admin_url``: its URL, and a context that drops it."""
    name = f"hpo_scale_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    @contextlib.contextmanager
    def dropping() -> Any:
        try:
            yield
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

    return make_url(admin_url).set(database=name).render_as_string(hide_password=False), dropping()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sections = ap.add_subparsers(dest="section", required=True)
    ask = sections.add_parser("ask", help="ask latency at many finished trials, against Optuna")
    ask.add_argument("--sizes", default="1000,10000", help="finished trials (comma-separated)")
    ask.add_argument("--asks", type=int, default=15, help="timed asks per study after the first")
    ask.add_argument("--gp-trials", type=int, default=200)
    ask.add_argument("--gp-asks", type=int, default=5)
    ask.add_argument("--no-journal", dest="journal", action="store_false")
    ask.add_argument(
        "--optuna-postgres",
        metavar="URL",
        help="also Optuna TPE on PostgreSQL, in a throwaway database on the server of this URL",
    )
    ask.add_argument("--quick", action="store_true", help="300 and 1,000 trials, GP at 60")
    loop = sections.add_parser("trial", help="one trial's ask and tell, against Optuna")
    loop.add_argument("--trials", type=int, default=300, help="trials on each side")
    loop.add_argument(
        "--parts",
        action="store_true",
        help="also time the parts: a bare FastAPI app's two POSTs, our service in process, "
        "and the same statements by sqlite3",
    )
    prune = sections.add_parser("prune", help="ASHA's decision at a rung, against Optuna")
    prune.add_argument("--sizes", default="1000,10000", help="finished trials (comma-separated)")
    prune.add_argument("--points", type=int, default=100, help="steps each finished trial has")
    prune.add_argument("--reports", type=int, default=10, help="timed reports per size")
    prune.add_argument("--postgres", metavar="ADMIN_URL", help="also on throwaway databases here")
    prune.add_argument("--no-sqlite", action="store_true", help="only the --postgres run")
    read = sections.add_parser("read", help="a study read back with its curves, against Optuna")
    read.add_argument("--sizes", default="1000,10000", help="finished trials (comma-separated)")
    read.add_argument("--points", type=int, default=20, help="steps each finished trial has")
    read.add_argument("--reads", type=int, default=3, help="timed reads per size")
    met = sections.add_parser("metrics", help="metric ingestion from many streaming trials")
    met.add_argument("--trials", type=int, default=64, help="concurrent streaming trials")
    met.add_argument("--batch", type=int, default=100, help="points per report")
    met.add_argument(
        "--interval",
        type=float,
        default=0.0,
        help="seconds between a trial's reports (0: flat out)",
    )
    met.add_argument("--seconds", type=float, default=20.0, help="streaming time per database")
    met.add_argument(
        "--timeline", action="store_true", help="count the reports over 100 ms by second"
    )
    met.add_argument("--complete", type=int, default=8, help="finished trials seeded first")
    met.add_argument("--workers", type=int, default=1, help="server processes (--workers)")
    met.add_argument("--postgres", metavar="ADMIN_URL", help="also on a throwaway database here")
    met.add_argument("--no-sqlite", action="store_true", help="only the --postgres run")
    met.add_argument(
        "--processes", type=int, default=4, help="client processes the trials are split over"
    )
    args = ap.parse_args(argv)
    if args.section == "metrics" and args.processes < 1:
        ap.error("--processes must be at least 1")
    if getattr(args, "no_sqlite", False) and not args.postgres:
        ap.error("--no-sqlite needs --postgres (else nothing runs)")
    if args.section == "metrics":
        run_metrics(args)
    elif args.section == "prune":
        run_prune(args)
    elif args.section == "read":
        run_read(args)
    elif args.section == "trial":
        run_trial(args)
    elif args.section == "ask":
        if args.quick:
            args.sizes, args.gp_trials, args.asks, args.gp_asks = "300,1000", 60, 5, 3
        run_ask(args)


if __name__ == "__main__":
    main()
