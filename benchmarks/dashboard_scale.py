"""The study page of a very large study: server memory and the cold load in headless Chromium.

A study of ``--trials`` trials with ``--steps`` points of ``loss`` each (10,000 × 1,000 = ten
million points by default) is bulk-inserted into a fresh SQLite database (the seeding of
``benchmarks/polling.py``; the curves kept at rest are then built from those points, as
migration 0008 back-fills them), then ``hpo serve`` starts on it and Chromium opens the study page
with cold server caches. Reported: the time until the page has finished its first poll (every
panel drawn, every curves page fetched; importance and the contour may still say
"computing…"), and until those two show their fitted answers; the requests and bytes of that
load; and the server's resident memory (RSS) before, after and at its peak (VmHWM), alone and
with its analysis worker.

The server keeps each fit of importance and the contour in the database (``study_analyses``),
and answers it from there while the study is unchanged, so on a reused ``--db`` a cold server
finds the fits of the last run: ``--analyses none`` deletes them first (a study viewed for the
first time since its last change), ``kept`` (the default) leaves them. What the run found is
printed as ``analyses_kept``.

    python benchmarks/dashboard_scale.py                       # 10,000 × 1,000; seeding ~minutes
    python benchmarks/dashboard_scale.py --trials 1000 --steps 100
    python benchmarks/dashboard_scale.py --db /tmp/big/hpo.db --analyses none
    python benchmarks/dashboard_scale.py --db /tmp/big/hpo.db --curves all   # every curve at once
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from dashboard_page import ARGS, LOADED, until  # run as a script: benchmarks/ is on the path
from playwright.sync_api import sync_playwright
from polling import seed
from sqlalchemy import delete, func, inspect, select

from hpo.api.demo import served
from hpo.service.db import make_engine
from hpo.service.db.models import StudyAnalysis
from hpo.service.storage import curves


def server_process(url: str) -> psutil.Process:
    """The ``hpo serve`` process listening on ``url``'s port."""
    port = re.search(r":(\d+)$", url).group(1)
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "serve" in cmd and port in cmd:
            return proc
    raise LookupError(f"no hpo serve on port {port}")


def memory_mb(proc: psutil.Process) -> dict[str, float]:
    """Resident memory now and at its peak (Linux ``VmHWM``), in MB: the server's, and with
    its child processes' (the analysis worker) added."""

    def peak(p: psutil.Process) -> int:
        status = Path(f"/proc/{p.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024

    children = proc.children(recursive=True)
    rss = proc.memory_info().rss
    return {
        "rss_mb": round(rss / 1e6),
        "peak_mb": round(peak(proc) / 1e6),
        "with_children_rss_mb": round((rss + sum(c.memory_info().rss for c in children)) / 1e6),
        "with_children_peak_mb": round((peak(proc) + sum(peak(c) for c in children)) / 1e6),
    }


# The importance and contour panels show their fitted answers (not "computing…"): on a cold
# server the first poll may have drawn them as computing, and a later poll shows them.
ANALYSED = (
    "() => window.hpo.page?.importance?.status === 'ready'"
    " && window.hpo.page?.contourAnswer?.status === 'ready'"
)


def cold_load(url: str, token: str, sid: int, curves_mode: str | None = None) -> dict[str, Any]:
    """Open the study page; how long until its first poll has finished, and what it fetched.
    ``curves_mode`` is the page's ``curves`` parameter (``all``, ``best``; None: its default,
    the best first past 2,000 trials)."""
    seen: list[tuple[str, int, int]] = []
    slowest: dict[str, float] = {}  # per endpoint (path without ids and query): longest, ms

    def answered(r: Any) -> None:
        if "/api/v1/" in r.url:
            path = r.url.split("/api/v1/")[1]
            seen.append((path, r.status, len(r.body())))
            what = re.sub(r"\d+", "N", path.split("?")[0])
            took = r.request.timing["responseEnd"]
            slowest[what] = max(slowest.get(what, 0.0), round(took))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("response", answered)
        start = time.monotonic()
        mode = f"&curves={curves_mode}" if curves_mode else ""
        page.goto(f"{url}/?study={sid}{mode}#token={token}")
        until(page, LOADED, timeout=600)
        took = time.monotonic() - start
        until(page, ANALYSED, timeout=600)
        analysed = time.monotonic() - start
        browser.close()
    return {
        "load_s": round(took, 2),
        "analyses_shown_s": round(analysed, 2),
        "requests": len(seen),
        "mb": round(sum(b for *_, b in seen) / 1e6, 1),
        "slowest_request_ms": slowest,
        "errors": errors,
    }


def build_curves(db: str) -> None:
    """The seeding bulk-inserts points past the report path: build the curves kept at rest
    from them, as migration 0008 does for a database that had points before it."""
    engine = make_engine(db)
    with engine.begin() as conn:
        curves.rebuild(conn)
    engine.dispose()


def kept_analyses(db: str, *, forget: bool) -> int:
    """How many fits the database keeps (deleted first when ``forget``)."""
    engine = make_engine(db)
    try:
        if not inspect(engine).has_table(StudyAnalysis.__tablename__):
            return 0  # a database the server has not migrated yet
        with engine.begin() as conn:
            if forget:
                conn.execute(delete(StudyAnalysis))
            return conn.scalar(select(func.count()).select_from(StudyAnalysis))
    finally:
        engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=1_000, help="metric points per trial")
    ap.add_argument("--running", type=int, default=8)
    ap.add_argument("--db", help="reuse (or keep) this SQLite file instead of a temporary one")
    ap.add_argument(
        "--analyses",
        choices=["kept", "none"],
        default="kept",
        help="leave the fits kept by an earlier run, or delete them first",
    )
    ap.add_argument(
        "--curves",
        choices=["all", "best"],
        help="the page's curves parameter: fetch every curve, or the best first "
        "(default: the page's own choice, the best first past 2,000 trials)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.db) if args.db else Path(tmp) / "hpo.db"
        db = f"sqlite:///{path}"
        if not path.exists():
            t0 = time.perf_counter()
            seed(db, args.trials, args.steps, args.running)
            print(f"seeded {args.trials} × {args.steps}: {time.perf_counter() - t0:.0f} s")
            t0 = time.perf_counter()
            build_curves(db)
            print(f"curves at rest built from the points: {time.perf_counter() - t0:.0f} s")
        sid = 1
        kept = kept_analyses(db, forget=args.analyses == "none")
        env = {"HPO_DATABASE_URL": db, "HPO_SCHEDULER": "false", "HPO_LOG_LEVEL": "warning"}
        with served(Path(tmp), env=env) as (url, token):
            proc = server_process(url)
            out: dict[str, Any] = {"analyses_kept": kept, "started": memory_mb(proc)}
            out["cold"] = cold_load(url, token, sid, args.curves)
            out["after_cold"] = memory_mb(proc)
            out["warm"] = cold_load(url, token, sid, args.curves)
            out["after_warm"] = memory_mb(proc)
            print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
