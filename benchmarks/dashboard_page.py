"""The study page in headless Chromium against a running ``hpo serve``: how long until every
panel is drawn, the main thread's long tasks, the JS heap, and the bytes of a poll when nothing
changed and when one trial finished.

    python benchmarks/dashboard_page.py http://127.0.0.1:8000 TOKEN STUDY_ID

It adds one complete trial to the study (ask + 50 points + tell) to measure a changed poll.
Needs Debian's chromium at /usr/bin/chromium; the figures are in docs/dashboard.md.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import httpx
from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
LONG_TASKS = """window.__lt = [];
new PerformanceObserver((l) => l.getEntries().forEach((e) => window.__lt.push(e.duration)))
  .observe({ type: "longtask", buffered: true });"""
LOADED = "() => window.hpo.page?.unfinished === false && !window.hpo.page.poller.busy"


def until(page: Any, script: str, arg: Any = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not page.evaluate(script, arg):
        if time.monotonic() > deadline:
            raise TimeoutError(script)
        page.wait_for_timeout(50)


def long_tasks(page: Any) -> dict[str, int]:
    lt = page.evaluate("window.__lt.splice(0)")
    return {"count": len(lt), "max_ms": round(max(lt, default=0))}


def main(url: str, token: str, sid: int) -> dict[str, Any]:
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    study = http.get(f"/api/v1/studies/{sid}").json()
    out: dict[str, Any] = {"trials": study["n_trials"], "counts": study["counts"]}
    seen: list[tuple[str, int, int]] = []

    def answered(r: Any) -> None:
        if "/api/v1/" in r.url:
            head = sum(len(h["name"]) + len(h["value"]) + 4 for h in r.headers_array()) + 17
            body = 0 if r.status == 304 else len(r.body())
            seen.append((r.url.split("/api/v1/")[1], r.status, head + body))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.add_init_script(LONG_TASKS)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("response", answered)
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")
        start = time.monotonic()
        page.goto(f"{url}/?study={sid}#token={token}")
        until(page, "() => document.querySelector('#importance .imp-row') !== null")
        until(page, LOADED)
        out["first_full_render_ms"] = round((time.monotonic() - start) * 1000)
        out["load"] = {"requests": len(seen), "bytes": sum(b for *_, b in seen)}
        out["load_long_tasks"] = long_tasks(page)
        out["table_rows"] = page.eval_on_selector_all("table.trials tbody tr", "r => r.length")

        seen.clear()
        page.wait_for_timeout(7000)  # two polls, nothing changed
        out["idle_polls"] = [(path, status, size) for path, status, size in seen]

        seen.clear()
        trial = http.post(f"/api/v1/studies/{sid}/ask").json()
        points = [{"step": s, "name": "loss", "value": 1 + 1 / (s + 1)} for s in range(50)]
        http.post(f"/api/v1/trials/{trial['trial_id']}/metrics", json={"points": points})
        values = {"values": [0.9] * len(study["directions"])}
        http.post(f"/api/v1/trials/{trial['trial_id']}/tell", json=values)
        page.wait_for_timeout(5000)
        out["one_trial_finished"] = {"requests": seen[:], "bytes": sum(b for *_, b in seen)}
        out["one_trial_long_tasks"] = long_tasks(page)
        metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
        out["js_heap_mb"] = round(metrics["JSHeapUsedSize"] / 2**20, 1)
        out["errors"] = errors
        browser.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3])), indent=1))
