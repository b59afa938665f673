"""The dashboard's polling under load: conditional polls against naive refetching.

A study with many trials and long metric series is seeded into a fresh SQLite database, then
``hpo serve`` answers many concurrent pollers over loopback, one mode at a time, each for a
fixed time:

* ``conditional`` polls the way the dashboard does: ``GET /studies/{id}`` with the ETag it
  holds; on a ``304`` (no trial changed state) it asks only for the learning curves changed
  after their own cursor (``since``; a 304 too while no trial reports). Only when the study
  changed does it fetch the trials changed after its cursor as well, again with ETags.
* ``naive`` refetches everything the page shows on every poll: the study, every trial (pages of
  1,000) and every learning curve (pages of 200 trials, 120 points each).

Two scenarios: ``idle`` (nothing changes) and ``live`` (a writer posts a metric point to one of
the running trials every ``--write-every`` seconds). Each poller polls every 3 s, as an open
dashboard does; the last windows poll back to back to find the capacity of conditional polls.

``--stream`` runs a third scenario alone: every running trial streams (one writer per trial,
a point every ``--write-every`` s each) while the pollers poll conditionally; its table adds
the share of study polls answered 304 and the poll p99.

The pollers run in ``--processes`` client processes (4), each an event loop of its own, as
pages are browsers of their own: with all 200 in one loop, the loop's own delays showed as
request latency (an outside client timed the same study polls at 3.5 ms p50 where the loop
saw 169 ms).

    python benchmarks/polling.py            # 2,000 trials × 300 steps; 10, 50, 200 pollers; ~10 min
    python benchmarks/polling.py --quick    # 300 trials × 100 steps; 20 pollers; ~1 min
    python benchmarks/polling.py --stream --pollers 200 --write-every 1   # 8 trials stream
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import random
import statistics
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert, update

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
from hpo.service.spec import StudySpec
from hpo.service.storage import Storage
from hpo.service.studies import StudyService

API = "/api/v1"
CURVE_POINTS = 120  # what the page asks for
CURVE_PAGE = 200
TRIAL_PAGE = 1000
# Whether the schema has the curves' own cursor (the script also measures the code before it).
CURVES_CURSOR = hasattr(Trial, "curve_seq")


# --- seeding ----------------------------------------------------------------------------------


def seed(url: str, n_trials: int, n_steps: int, n_running: int) -> int:
    """A running study of ``n_trials`` trials (the last ``n_running`` still running), each with
    ``n_steps`` points of ``loss``. Rows are bulk-inserted: asking 2,000 trials over HTTP would
    take minutes and is not what is measured here."""
    engine = make_engine(url)
    upgrade_schema(engine)
    storage = Storage(engine)
    spec = StudySpec.model_validate(
        {
            "name": "polling-bench",
            "objective": {"metric": "loss", "direction": "minimize"},
            "sampler": {"type": "random", "seed": 0},
            "budget": {"max_trials": n_trials + 100},
            "lease_s": 86_400,
            "space": {
                "lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True},
                "x": {"type": "float", "low": -5.0, "high": 5.0},
                "layers": {"type": "int", "low": 1, "high": 8},
                "opt": {"type": "categorical", "choices": ["sgd", "adam", "rmsprop"]},
            },
        }
    )
    study_id = StudyService(storage).create_study(spec).id
    rng = random.Random(0)
    now = utcnow()
    trials, params, points, events = [], [], [], []
    for i in range(n_trials):
        tid = i + 1
        running = i >= n_trials - n_running
        p = {
            "lr": 10 ** rng.uniform(-5, 0),
            "x": rng.uniform(-5, 5),
            "layers": rng.randint(1, 8),
            "opt": rng.choice(["sgd", "adam", "rmsprop"]),
        }
        final = 0.1 + 0.3 * abs(math.log10(p["lr"]) + 2.5) + 0.01 * p["x"] ** 2
        curve = [final + 2 * math.exp(-s / 40) + rng.gauss(0, 0.02) for s in range(n_steps)]
        trials.append(
            {
                "id": tid,
                "study_id": study_id,
                "number": i,
                "state": "running" if running else "complete",
                "value": None if running else curve[-1],
                "attempts": 1,
                "seq": i + 2,
                **({"curve_seq": i + 2} if CURVES_CURSOR else {}),
                "last_step": n_steps - 1,
                "created_at": now,
                "started_at": now,
                "finished_at": None if running else now,
                "lease_expires_at": now + timedelta(days=1) if running else None,
            }
        )
        params += [
            {"trial_id": tid, "name": k, "position": j, "value": v}
            for j, (k, v) in enumerate(p.items())
        ]
        points += [
            {"trial_id": tid, "study_id": study_id, "step": s, "name": "loss", "value": v}
            for s, v in enumerate(curve)
        ]
        events.append({"trial_id": tid, "state": "running", "attempt": 1, "time": now})
        if len(points) >= 200_000 or i == n_trials - 1:  # 10,000 × 1,000 points fit no list
            with storage.write() as s:
                s.execute(insert(Trial), trials)
                s.execute(insert(TrialParam), params)
                s.execute(insert(TrialEvent), events)
                for k in range(0, len(points), 50_000):
                    s.execute(insert(MetricPoint), points[k : k + 50_000])
            trials, params, points, events = [], [], [], []
    with storage.write() as s:
        s.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(
                seq=n_trials + 2,
                **({"curve_seq": n_trials + 2} if CURVES_CURSOR else {}),
                next_number=n_trials,
                updated_at=now,
            )
        )
    engine.dispose()
    return study_id


# --- pollers ----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one mode's pollers saw."""

    latencies: list[float] = field(default_factory=list)  # per request, seconds
    polls: list[float] = field(default_factory=list)  # per whole poll, seconds
    poll_bytes: list[int] = field(default_factory=list)  # per whole poll
    statuses: Counter = field(default_factory=Counter)
    study_statuses: Counter = field(default_factory=Counter)  # of GET /studies/{id} alone
    bytes: int = 0

    def add(self, response: httpx.Response, seconds: float) -> None:
        self.latencies.append(seconds)
        self.statuses[response.status_code] += 1
        head = sum(len(k) + len(v) + 4 for k, v in response.headers.raw) + 17
        self.bytes += head + len(response.content)


async def fetch(
    client: httpx.AsyncClient, tally: Tally, path: str, tags: dict | None = None
) -> Any:
    """GET ``path``; with ``tags`` send the ETag held for it and return None on 304."""
    headers = {"If-None-Match": tags[path]} if tags is not None and path in tags else {}
    start = time.perf_counter()
    r = await client.get(path, headers=headers)
    tally.add(r, time.perf_counter() - start)
    if path.rsplit("/", 2)[-2] == "studies":
        tally.study_statuses[r.status_code] += 1
    if r.status_code == 304:
        return None
    r.raise_for_status()
    if tags is not None and "etag" in r.headers:
        tags[path] = r.headers["etag"]
    return r.json()


@dataclass
class PageState:
    """What an open dashboard page holds between polls: ETags and the two cursors."""

    tags: dict[str, str] = field(default_factory=dict)
    cursor: int | None = None
    curves_cursor: int | None = None

    def copy(self) -> PageState:
        return PageState(dict(self.tags), self.cursor, self.curves_cursor)


def _trials_path(sid: int, since: int | None) -> str:
    return f"{API}/studies/{sid}/trials" + ("" if since is None else f"?since={since}")


def _curves_path(sid: int, since: int | None) -> str:
    path = f"{API}/studies/{sid}/curves?max_points={CURVE_POINTS}&limit={CURVE_PAGE}"
    return path if since is None else f"{path}&since={since}"


async def conditional_poll(client: httpx.AsyncClient, sid: int, page: PageState, t: Tally) -> None:
    """One poll of the dashboard: on a 304 for the study, the curves' delta alone; else the
    trials' delta too."""
    if await fetch(client, t, f"{API}/studies/{sid}", page.tags) is None and page.cursor:
        await pull_curves(client, sid, page, t)
        return
    while True:
        body = await fetch(client, t, _trials_path(sid, page.cursor), page.tags)
        if body is None:
            break
        full = len(body["trials"]) == TRIAL_PAGE and body["cursor"] != page.cursor
        page.cursor = body["cursor"]
        if not full:
            break
    await pull_curves(client, sid, page, t)


async def pull_curves(client: httpx.AsyncClient, sid: int, page: PageState, t: Tally) -> None:
    """The learning curves changed after the page's curves cursor (a 304 when none)."""
    while True:
        body = await fetch(client, t, _curves_path(sid, page.curves_cursor), page.tags)
        if body is None:
            break
        page.curves_cursor = body["cursor"]
        if not body["more"]:
            break


async def naive_poll(client: httpx.AsyncClient, sid: int, t: Tally) -> None:
    """Everything the page shows, fetched again."""
    await fetch(client, t, f"{API}/studies/{sid}")
    since = None
    while True:
        body = await fetch(client, t, _trials_path(sid, since))
        if len(body["trials"]) < TRIAL_PAGE:
            break
        since = body["cursor"]
    since = None
    while True:
        body = await fetch(client, t, _curves_path(sid, since))
        if not body["more"]:
            break
        since = body["cursor"]


@dataclass(frozen=True)
class Window:
    """One measurement: a scenario, a polling mode, how many pollers and how often each polls
    (0: back to back)."""

    scenario: str
    mode: str
    pollers: int
    every: float


async def poller(url: str, token: str, w: Window, sid: int, page: PageState, t: Tally) -> None:
    """Poll until cancelled, every ``w.every`` seconds from a random offset (only finished
    requests and polls are counted)."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        await asyncio.sleep(random.uniform(0, w.every))
        while True:
            start, before = time.perf_counter(), t.bytes
            if w.mode == "naive":
                await naive_poll(client, sid, t)
            else:
                await conditional_poll(client, sid, page, t)
            t.polls.append(time.perf_counter() - start)
            t.poll_bytes.append(t.bytes - before)
            await asyncio.sleep(max(0.0, w.every - t.polls[-1]))


async def writer(
    url: str, token: str, trial_ids: list[int], every: float, t: Tally, offset: bool = False
) -> None:
    """Post one new metric point to a running trial every ``every`` seconds (from a random
    offset when ``offset``: streams of many trials do not report in step)."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        if offset:
            await asyncio.sleep(random.uniform(0, every))
        for n in range(10**9):
            body = {"points": [{"step": 10_000 + n, "name": "loss", "value": 0.5}]}
            tid = trial_ids[n % len(trial_ids)]
            start = time.perf_counter()
            (await client.post(f"{API}/trials/{tid}/metrics", json=body)).raise_for_status()
            t.latencies.append(time.perf_counter() - start)
            await asyncio.sleep(every)


async def measure(
    url: str,
    token: str,
    sid: int,
    w: Window,
    seconds: float,
    live: list[int],
    every: float,
    processes: int,
) -> tuple[Tally, Tally]:
    """Run window ``w`` for ``seconds`` (with the writer when ``live`` names trials); what is
    still in flight then is cancelled and not counted. Every poller starts as a page that has
    just loaded everything. The pollers are split over ``processes`` client processes (each
    page is a browser of its own: one event loop driving hundreds of clients measures its own
    delays as the server's); the writers run here."""
    page, _, _ = await first_load(url, token, sid)
    written = Tally()
    loop = asyncio.get_running_loop()
    shares = [w.pollers // processes + (i < w.pollers % processes) for i in range(processes)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        # Every client process up (this script imported) before the window starts.
        await asyncio.gather(*(loop.run_in_executor(pool, time.sleep, 0.5) for _ in shares))
        stop_at = time.monotonic() + seconds  # CLOCK_MONOTONIC: one clock for the processes
        parts = [
            loop.run_in_executor(pool, poll_until, url, token, sid, w, stop_at, page, n)
            for n in shares
            if n
        ]
        tasks = []
        if live and w.scenario == "stream":  # every running trial streams on its own
            tasks += [
                asyncio.create_task(writer(url, token, [tid], every, written, offset=True))
                for tid in live
            ]
        elif live:
            tasks.append(asyncio.create_task(writer(url, token, live, every, written)))
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tallies = await asyncio.gather(*parts)
    await drained(url)
    return merged(tallies), written


def poll_until(
    url: str, token: str, sid: int, w: Window, stop_at: float, page: PageState, n: int
) -> Tally:
    """``n`` pollers of window ``w`` until ``stop_at`` (``time.monotonic``), in this (client)
    process."""
    return asyncio.run(_pollers(url, token, sid, w, stop_at, page, n))


async def _pollers(
    url: str, token: str, sid: int, w: Window, stop_at: float, page: PageState, n: int
) -> Tally:
    tallies = [Tally() for _ in range(n)]
    tasks = [asyncio.create_task(poller(url, token, w, sid, page.copy(), t)) for t in tallies]
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return merged(tallies)


def merged(tallies: list[Tally]) -> Tally:
    """One tally of what all of ``tallies`` saw."""
    total = Tally()
    for t in tallies:
        total.latencies += t.latencies
        total.polls += t.polls
        total.poll_bytes += t.poll_bytes
        total.statuses += t.statuses
        total.study_statuses += t.study_statuses
        total.bytes += t.bytes
    return total


async def drained(url: str, timeout: float = 600) -> None:
    """Wait until the server has worked off what cancelled pollers left queued (``/healthz``
    answers fast five times in a row), so one window does not slow the next."""
    fast, deadline = 0, time.perf_counter() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        while fast < 5 and time.perf_counter() < deadline:
            start = time.perf_counter()
            await client.get("/healthz")
            fast = fast + 1 if time.perf_counter() - start < 0.02 else 0
            await asyncio.sleep(0.2)


async def first_load(url: str, token: str, sid: int) -> tuple[PageState, float, int]:
    """The page's first visit (everything, with cursors and ETags recorded)."""
    page, tally = PageState(), Tally()
    headers = {"Authorization": f"Bearer {token}"}
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        await conditional_poll(client, sid, page, tally)
    return page, time.perf_counter() - start, tally.bytes


# --- report -----------------------------------------------------------------------------------


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (NaN when nothing finished)."""
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def ms(values: list[float], q: int) -> str:
    return "-" if not values else f"{pct(values, q) * 1000:.0f}"


def row(w: Window, t: Tally, seconds: float, written: Tally) -> str:
    n = sum(t.statuses.values())
    every = f"{w.every:g} s" if w.every else "back to back"
    writes = (
        f"{len(written.latencies)} ({ms(written.latencies, 50)} ms)"
        if w.scenario == "live"
        else "-"
    )
    per_poll = f"{statistics.fmean(t.poll_bytes) / 1e3:.1f}" if t.poll_bytes else "-"
    return (
        f"| {w.scenario} | {w.mode} | {w.pollers} | {every} | {len(t.polls) / seconds:.1f} "
        f"| {n / seconds:.0f} | {ms(t.latencies, 50)} | {ms(t.latencies, 95)} "
        f"| {ms(t.polls, 50)} | {ms(t.polls, 95)} | {t.statuses[304] / max(1, n):.1%} "
        f"| {t.bytes / 1e6 / seconds:.2f} | {per_poll} | {writes} |"
    )


def stream_row(w: Window, t: Tally, seconds: float, written: Tally) -> str:
    n, studies = sum(t.statuses.values()), sum(t.study_statuses.values())
    return (
        f"| {w.pollers} | {w.every:g} s | {len(t.polls) / seconds:.1f} | {n / seconds:.0f} "
        f"| {t.study_statuses[304] / max(1, studies):.1%} | {t.statuses[304] / max(1, n):.1%} "
        f"| {ms(t.latencies, 50)} | {ms(t.polls, 50)} | {ms(t.polls, 99)} "
        f"| {len(written.latencies) / seconds:.1f} ({ms(written.latencies, 50)} ms) |"
    )


STREAM_HEADER = (
    "| pollers | each polls | polls/s | requests/s | study 304 share | all 304 share "
    "| req p50 ms | poll p50 ms | poll p99 ms | points/s (post p50) |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)

HEADER = (
    "| scenario | mode | pollers | each polls | polls/s | requests/s | req p50 ms | req p95 ms "
    "| poll p50 ms | poll p95 ms | 304 share | MB/s | kB/poll | writes (p50) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=300, help="metric points per trial")
    ap.add_argument("--running", type=int, default=8, help="trials left running")
    ap.add_argument("--pollers", default="10,50,200", help="comma-separated concurrency levels")
    ap.add_argument("--every", type=float, default=3.0, help="s between one poller's polls")
    ap.add_argument("--seconds", type=float, default=30, help="length of each window")
    ap.add_argument("--write-every", type=float, default=0.5, help="live scenario: s per point")
    ap.add_argument("--quick", action="store_true", help="300 trials, 20 pollers, 5-s windows")
    ap.add_argument(
        "--processes", type=int, default=4, help="client processes the pollers are split over"
    )
    ap.add_argument(
        "--stream", action="store_true", help="only: every running trial streams, conditional"
    )
    args = ap.parse_args()
    if args.processes < 1:
        ap.error("--processes must be at least 1")
    if args.quick:
        args.trials, args.steps, args.pollers, args.seconds = 300, 100, "20", 5
    levels = [int(p) for p in args.pollers.split(",")]
    windows = [
        Window(scenario, mode, n, args.every)
        for scenario in ("idle", "live")
        for n in levels
        for mode in ("naive", "conditional")
    ] + [Window("idle", "conditional", n, 0) for n in levels]
    if args.stream:
        windows = [Window("stream", "conditional", n, args.every) for n in levels]
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{Path(tmp) / 'hpo.db'}"
        t0 = time.perf_counter()
        sid = seed(db, args.trials, args.steps, args.running)
        print(f"seeded {args.trials} trials × {args.steps} steps: {time.perf_counter() - t0:.1f} s")
        env = {"HPO_DATABASE_URL": db, "HPO_SCHEDULER": "false", "HPO_LOG_LEVEL": "warning"}
        with served(Path(tmp), env=env) as (url, token):
            for caches in ("cold", "warm"):
                _, took, size = asyncio.run(first_load(url, token, sid))
                print(f"first page load ({caches} caches): {took:.2f} s, {size / 1e6:.1f} MB")
            live = list(range(args.trials - args.running + 1, args.trials + 1))
            print("\n" + (STREAM_HEADER if args.stream else HEADER))
            for w in windows:
                writes = live if w.scenario in ("live", "stream") else []
                tally, written = asyncio.run(
                    measure(
                        url, token, sid, w, args.seconds, writes, args.write_every, args.processes
                    )
                )
                show = stream_row if args.stream else row
                print(show(w, tally, args.seconds, written), flush=True)


if __name__ == "__main__":
    main()
