"""The dashboard over real HTTP: its public page and files, the read endpoints its plots poll
(conditional GETs, validation, downsampling, importance), and the page itself driven in
headless Chromium against ``hpo serve``."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hpo.service.db import make_engine
from hpo.service.storage import Storage, analyses
from hpo.service.storage.seqs import KNOWN_SEQ_S
from tests.conftest import ServerProcess, simple_spec, wait_for

API = "/api/v1"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


# ------------------------------------------------------------------ helpers


def create(http: httpx.Client, name: str = "s", **over: Any) -> int:
    return create_spec(http, simple_spec(name, **over))


def create_spec(http: httpx.Client, spec: dict) -> int:
    r = http.post(f"{API}/studies", json=spec)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def ask(http: httpx.Client, sid: int) -> dict:
    r = http.post(f"{API}/studies/{sid}/ask")
    assert r.status_code == 201, r.text
    return r.json()


def report(http: httpx.Client, tid: int, points: list[tuple[int, str, float]]) -> None:
    body = {"points": [{"step": s, "name": n, "value": v} for s, n, v in points]}
    r = http.post(f"{API}/trials/{tid}/metrics", json=body)
    assert r.status_code == 200, r.text


def tell(http: httpx.Client, tid: int, **body: Any) -> None:
    r = http.post(f"{API}/trials/{tid}/tell", json=body)
    assert r.status_code == 200, r.text


def ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    return r.json()


def assert_field(r: httpx.Response, status: int, field: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["field"] == field, r.json()


def study_with_trials(http: httpx.Client, n: int = 6, steps: int = 5) -> tuple[int, list[dict]]:
    """A study whose trials report ``steps`` points of loss and acc; all but the last two
    are told."""
    sid = create(http, "dash", budget={"max_trials": 100})
    trials = []
    for i in range(n):
        t = ask(http, sid)
        x = t["params"]["x"]
        report(http, t["trial_id"], [(s, "loss", x * x + 1 / (s + 1)) for s in range(steps)])
        report(http, t["trial_id"], [(s, "acc", 1 - 1 / (s + 2)) for s in range(steps)])
        if i < n - 2:
            tell(http, t["trial_id"], value=x * x)
        trials.append(t)
    return sid, trials


# ----------------------------------------------------------- the page's files


def test_page_and_its_files_are_public_and_revalidated(sqlite_server: ServerProcess) -> None:
    page = httpx.get(sqlite_server.url + "/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-cache"
    assert '<script type="module" src="/static/js/main.js">' in page.text
    again = httpx.get(sqlite_server.url + "/", headers={"If-None-Match": page.headers["etag"]})
    assert again.status_code == 304 and again.content == b""

    # Every module the page imports is served, as JavaScript, with no CDN in sight.
    seen, todo = set(), ["js/main.js", "app.css"]
    while todo:
        path = todo.pop()
        seen.add(path)
        r = httpx.get(f"{sqlite_server.url}/static/{path}")
        assert r.status_code == 200, path
        kind = "text/css" if path.endswith(".css") else "text/javascript"
        assert r.headers["content-type"].startswith(kind), (path, r.headers)
        assert "http://" not in r.text and "https://" not in r.text, path
        for name in re.findall(r'from "\./([\w.]+\.js)"', r.text):
            if f"js/{name}" not in seen:
                todo.append(f"js/{name}")
    assert {"js/api.js", "js/plot.js", "js/study.js", "js/studies.js"} <= seen

    for bad in ("nope.js", "../routes/dashboard.py", "..%2F..%2Fapp.py", "js"):
        assert httpx.get(f"{sqlite_server.url}/static/{bad}").status_code == 404, bad


def test_dashboard_endpoints_need_the_token(sqlite_server: ServerProcess) -> None:
    with sqlite_server.http() as http:
        sid, trials = study_with_trials(http, n=2)
    tid = trials[0]["trial_id"]
    for path in (
        "/dashboard/studies",
        f"/studies/{sid}/curves",
        f"/studies/{sid}/importance",
        f"/studies/{sid}/contour?x=x&y=n",
        f"/trials/{tid}/series",
    ):
        r = httpx.get(sqlite_server.url + API + path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"


# ----------------------------------------------------- conditional polling


def polled_paths(http: httpx.Client, sid: int, tid: int) -> dict[str, str]:
    """Every URL the study page and the list page poll, as they poll them: the trials and
    curves with the cursor of a first, full fetch."""
    cursor = ok(http.get(f"{API}/studies/{sid}/trials"))["cursor"]
    curves_cursor = ok(http.get(f"{API}/studies/{sid}/curves"))["cursor"]
    return {
        "studies": f"{API}/dashboard/studies",
        "study": f"{API}/studies/{sid}",
        "trials": f"{API}/studies/{sid}/trials?since={cursor}",
        "curves": f"{API}/studies/{sid}/curves?max_points=120&since={curves_cursor}&limit=200",
        "importance": f"{API}/studies/{sid}/importance?objective=0",
        "contour": f"{API}/studies/{sid}/contour?x=x&y=n&objective=0",
        "series": f"{API}/trials/{tid}/series?max_points=1000",
    }


def test_each_polled_endpoint_answers_304_until_something_changes(server: ServerProcess) -> None:
    with server.http() as http:
        sid, trials = study_with_trials(http)
        running = trials[-1]["trial_id"]
        paths = polled_paths(http, sid, running)
        tags = {}
        for name, path in paths.items():
            first = http.get(path)
            assert first.status_code == 200, (name, first.text)
            tags[name] = first.headers["etag"]
            again = http.get(path, headers={"If-None-Match": tags[name]})
            assert again.status_code == 304, name
            assert again.content == b"" and again.headers["etag"] == tags[name], name

        report(http, running, [(5, "loss", 0.5)])  # one new point of a running trial

        # A point moves what shows points (the trials carry last_step); the study, its
        # summary and the analyses over complete trials stay 304.
        grew = {"trials", "curves", "series"}
        for name, path in paths.items():
            after = http.get(path, headers={"If-None-Match": tags[name]})
            assert after.status_code == (200 if name in grew else 304), name
            assert (after.headers["etag"] != tags[name]) == (name in grew), name
            tags[name] = after.headers["etag"]
        changed = http.get(paths["trials"]).json()["trials"]
        assert [t["id"] for t in changed] == [running]
        curves = http.get(paths["curves"]).json()["series"]
        assert [c["trial_id"] for c in curves] == [running]
        assert curves[0]["steps"][-1] == 5 and curves[0]["values"][-1] == 0.5
        # read at the same change: the page keeps the later of two readings of last_step
        assert curves[0]["curve_seq"] == changed[0]["curve_seq"] > 0
        assert curves[0]["last_step"] == changed[0]["last_step"] == 5

        # A change of state moves the study's tags too.
        tell(http, running, value=0.25)
        for name in ("studies", "study", "trials", "importance", "contour"):
            after = http.get(paths[name], headers={"If-None-Match": tags[name]})
            assert after.status_code == 200, name


def test_a_study_changed_through_another_server_polls_200_within_a_second(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A server answers a study poll's ETag check from the seq it last read (no database
    read) for at most KNOWN_SEQ_S: a change made through a second server on the same database
    is 304 on the first for no longer than that, then 200 with the change."""
    (tmp_path / "b").mkdir()
    other = ServerProcess(server.database_url, tmp_path / "b", {"HPO_SCHEDULER": "false"})
    other.token = server.token
    with other, server.http() as on_a, other.http() as on_b:
        sid = create(on_a, "two")
        path = f"{API}/studies/{sid}"
        tag = on_a.get(path).headers["etag"]
        assert on_a.get(path, headers={"If-None-Match": tag}).status_code == 304
        changed_at = time.monotonic()
        assert on_b.patch(path, json={"state": "paused"}).status_code == 200
        stale = []
        while (answer := on_a.get(path, headers={"If-None-Match": tag})).status_code == 304:
            stale.append(time.monotonic() - changed_at)
            assert stale[-1] < KNOWN_SEQ_S + 1.0, stale  # never longer than that (and slack)
            time.sleep(0.05)
        assert answer.status_code == 200 and answer.json()["state"] == "paused"
        assert answer.headers["etag"] == on_b.get(path).headers["etag"] != tag


def test_a_trials_series_tag_moves_only_with_that_trial(server: ServerProcess) -> None:
    with server.http() as http:
        _, trials = study_with_trials(http)
        a, b = trials[-2]["trial_id"], trials[-1]["trial_id"]
        path = f"{API}/trials/{a}/series"
        tag = http.get(path).headers["etag"]
        report(http, b, [(9, "loss", 1.0)])
        assert http.get(path, headers={"If-None-Match": tag}).status_code == 304
        report(http, a, [(9, "loss", 1.0)])
        assert http.get(path, headers={"If-None-Match": tag}).status_code == 200


def test_studies_summary_lists_counts_budget_and_best(server: ServerProcess) -> None:
    with server.http() as http:
        sid, trials = study_with_trials(http)
        other = create(http, "other")
        http.patch(f"{API}/studies/{other}", json={"state": "paused"})
        body = ok(http.get(f"{API}/dashboard/studies"))
        assert body["truncated"] is False
        by_name = {s["name"]: s for s in body["studies"]}
        dash = by_name["dash"]
        assert dash["id"] == sid and dash["state"] == "running" and dash["sampler"] == "random"
        assert dash["counts"]["complete"] == 4 and dash["counts"]["running"] == 2
        assert dash["max_trials"] == 100 and dash["n_trials"] == 6
        best = min(t["params"]["x"] ** 2 for t in trials[:4])
        assert dash["best_value"] == pytest.approx(best)
        assert by_name["other"]["state"] == "paused" and by_name["other"]["best_value"] is None
        paused = ok(http.get(f"{API}/dashboard/studies", params={"state": "paused"}))
        assert [s["name"] for s in paused["studies"]] == ["other"]
        tag = http.get(f"{API}/dashboard/studies").headers["etag"]
        create(http, "third")
        assert (
            http.get(f"{API}/dashboard/studies", headers={"If-None-Match": tag}).status_code == 200
        )


# --------------------------------------------------------------- curves


def test_curves_are_downsampled_incremental_and_paged(server: ServerProcess) -> None:
    with server.http() as http:
        sid = create(http, "curves", budget={"max_trials": 10})
        long, short = ask(http, sid), ask(http, sid)
        values = [math.sin(s / 50) + (3.0 if s == 1234 else 0.0) for s in range(3000)]
        report(http, long["trial_id"], [(s, "loss", v) for s, v in enumerate(values)])
        report(http, short["trial_id"], [(0, "loss", 2.0), (1, "loss", 1.0), (0, "acc", 0.5)])

        body = ok(http.get(f"{API}/studies/{sid}/curves", params={"max_points": 50}))
        assert body["metric"] == "loss" and body["names"] == ["acc", "loss"]
        assert body["more"] is False
        series = {c["trial_id"]: c for c in body["series"]}
        c = series[long["trial_id"]]
        assert c["n"] == 3000 and len(c["steps"]) <= 50 and len(c["steps"]) == len(c["values"])
        assert c["steps"][0] == 0 and c["steps"][-1] == 2999
        assert 1234 in c["steps"] and max(c["values"]) == max(values)
        assert min(c["values"]) == min(values)
        assert series[short["trial_id"]]["steps"] == [0, 1]
        acc = ok(http.get(f"{API}/studies/{sid}/curves", params={"metric": "acc"}))
        assert [c["trial_id"] for c in acc["series"]] == [short["trial_id"]]

        # Only what changed after the cursor comes back.
        report(http, short["trial_id"], [(2, "loss", 0.5)])
        delta = ok(http.get(f"{API}/studies/{sid}/curves", params={"since": body["cursor"]}))
        assert [c["trial_id"] for c in delta["series"]] == [short["trial_id"]]
        assert delta["series"][0]["values"] == [2.0, 1.0, 0.5]

        # Paging: one trial per page, then the rest.
        first = ok(http.get(f"{API}/studies/{sid}/curves", params={"limit": 1}))
        assert first["more"] is True and len(first["series"]) == 1
        rest = ok(
            http.get(f"{API}/studies/{sid}/curves", params={"limit": 1, "since": first["cursor"]})
        )
        got = {first["series"][0]["trial_id"], rest["series"][0]["trial_id"]}
        assert got == {long["trial_id"], short["trial_id"]}

        detail = ok(http.get(f"{API}/trials/{long['trial_id']}/series", params={"max_points": 20}))
        assert (
            detail["series"]["loss"]["n"] == 3000 and len(detail["series"]["loss"]["steps"]) <= 20
        )


def test_a_large_studys_first_curves_are_its_best_and_its_unfinished(server: ServerProcess) -> None:
    """``best=N``: the curves of the N best complete trials by the chosen objective (of those
    with a curve) and of at most N unfinished trials, in one answer, with the cursor to
    follow every change after it."""
    with server.http() as http:
        sid = create(http, "best", budget={"max_trials": 20})
        told: dict[int, float] = {}
        for i in range(6):
            t = ask(http, sid)
            report(http, t["trial_id"], [(0, "loss", 9.0), (1, "loss", float(i))])
            tell(http, t["trial_id"], value=float((i * 7) % 6))  # values 0, 1, 2, 3, 4, 5 mixed
            told[t["trial_id"]] = float((i * 7) % 6)
        pruned = ask(http, sid)
        report(http, pruned["trial_id"], [(0, "loss", 9.0)])
        tell(http, pruned["trial_id"], state="pruned")
        no_curve = ask(http, sid)  # the best value, but nothing to draw: not one of the best
        tell(http, no_curve["trial_id"], value=-1.0)
        running = [ask(http, sid) for _ in range(2)]
        report(http, running[0]["trial_id"], [(0, "loss", 9.0)])

        body = ok(http.get(f"{API}/studies/{sid}/curves", params={"best": 3}))
        lowest = sorted(told, key=told.get)[:3]
        assert {c["trial_id"] for c in body["series"]} == {*lowest, running[0]["trial_id"]}
        seqs = [c["curve_seq"] for c in body["series"]]
        assert seqs == sorted(seqs) and body["more"] is False
        assert ok(http.get(f"{API}/studies/{sid}/curves", params={"best": 3, "limit": 1})) == body
        # At most N unfinished too: the one changed last.
        one = ok(http.get(f"{API}/studies/{sid}/curves", params={"best": 1}))
        assert [c["trial_id"] for c in one["series"]] == [lowest[0], running[0]["trial_id"]]
        # From its cursor: every change, of any trial.
        report(http, running[1]["trial_id"], [(0, "loss", 8.0)])
        delta = ok(http.get(f"{API}/studies/{sid}/curves", params={"since": body["cursor"]}))
        assert [c["trial_id"] for c in delta["series"]] == [running[1]["trial_id"]]

        # Bigger is better, and a multi-objective study's second objective.
        objectives = [
            {"metric": "loss", "direction": "minimize"},
            {"metric": "acc", "direction": "maximize"},
        ]
        sid2 = create(http, "best2", objective=objectives, budget={"max_trials": 20})
        told2 = {}
        for loss, acc in ((0.1, 0.5), (0.9, 0.9), (0.5, 0.7)):  # each objective its own best
            t = ask(http, sid2)
            report(http, t["trial_id"], [(0, "loss", 1.0)])
            tell(http, t["trial_id"], values=[loss, acc])
            told2[(loss, acc)] = t["trial_id"]
        body = ok(http.get(f"{API}/studies/{sid2}/curves", params={"best": 1, "objective": 1}))
        assert [c["trial_id"] for c in body["series"]] == [told2[0.9, 0.9]]
        body = ok(http.get(f"{API}/studies/{sid2}/curves", params={"best": 1, "objective": 0}))
        assert [c["trial_id"] for c in body["series"]] == [told2[0.1, 0.5]]

        curves = f"{API}/studies/{sid}/curves"
        assert_field(http.get(curves, params={"best": 0}), 422, "query.best")
        assert_field(http.get(curves, params={"best": 1001}), 422, "query.best")
        assert_field(http.get(curves, params={"best": 3, "since": 1}), 422, "best")
        assert_field(http.get(curves, params={"best": 3, "objective": 1}), 422, "objective")
        assert_field(http.get(curves, params={"objective": 1}), 422, "objective")


# ------------------------------------------------------- importance, contour


def test_importance_and_contour_over_http(sqlite_server: ServerProcess) -> None:
    with sqlite_server.http() as http:
        sid = create(http, "imp", budget={"max_trials": 60})
        for _ in range(40):
            t = ask(http, sid)
            tell(http, t["trial_id"], value=t["params"]["x"] ** 2 + 0.01 * t["params"]["n"])
        body = ok(http.get(f"{API}/studies/{sid}/importance"))
        assert list(body["importances"]) == ["x", "n"]
        assert body["importances"]["x"] > 0.8 and body["n_trials"] == 40
        assert sum(body["importances"].values()) == pytest.approx(1.0)

        grid = ok(http.get(f"{API}/studies/{sid}/contour", params={"x": "x", "y": "n", "size": 8}))
        assert grid["x"]["name"] == "x" and len(grid["x"]["values"]) == 8
        assert len(grid["z"]) == len(grid["y"]["values"]) and len(grid["points"]) == 40
        query = {"x": "x", "y": "n", "size": 8, "points": "false"}  # the page has the trials
        bare = ok(http.get(f"{API}/studies/{sid}/contour", params=query))
        assert bare["points"] == [] and bare["z"] == grid["z"] and bare["x"] == grid["x"]

        # a fit kept in another shape (other code under the same key) is fitted again, not a 500
        storage = Storage(make_engine(sqlite_server.database_url))
        seq = storage.study_seq(sid)
        importance, contour = analyses.key("importance", 0), analyses.key("contour", "x", "n", 0, 8)
        for other in ({"other": "shape"}, {"importances": [1], "n_trials": "many"}):
            for name in (importance, contour):
                analyses.put(storage, sid, name, seq, other)
            assert ok(http.get(f"{API}/studies/{sid}/importance")) == body
            assert ok(http.get(f"{API}/studies/{sid}/contour", params=query)) == bare
        storage.engine.dispose()

        assert_field(http.get(f"{API}/studies/{sid}/importance?objective=1"), 422, "objective")
        assert_field(http.get(f"{API}/studies/{sid}/contour?x=nope&y=n"), 422, "x")
        assert_field(http.get(f"{API}/studies/{sid}/contour?x=n&y=n"), 422, "y")


def test_query_parameters_are_validated(sqlite_server: ServerProcess) -> None:
    with sqlite_server.http() as http:
        sid, trials = study_with_trials(http, n=2)
        tid = trials[0]["trial_id"]
        cases = {
            f"/studies/{sid}/curves?max_points=3": "query.max_points",
            f"/studies/{sid}/curves?max_points=abc": "query.max_points",
            f"/studies/{sid}/curves?limit=0": "query.limit",
            f"/studies/{sid}/curves?since=-1": "query.since",
            f"/studies/{sid}/curves?metric=": "query.metric",
            f"/studies/{sid}/importance?objective=-1": "query.objective",
            f"/studies/{sid}/contour?y=n": "query.x",
            f"/studies/{sid}/contour?x=x&y=n&size=1": "query.size",
            f"/trials/{tid}/series?max_points=100000": "query.max_points",
            "/dashboard/studies?state=bogus": "query.state",
            "/dashboard/studies?limit=0": "query.limit",
        }
        for path, field in cases.items():
            assert_field(http.get(API + path), 422, field)
        assert_field(http.get(f"{API}/studies/999/curves"), 404, "study_id")
        assert_field(http.get(f"{API}/studies/999/importance"), 404, "study_id")
        assert_field(http.get(f"{API}/trials/999/series"), 404, "trial_id")


# ------------------------------------------------------------------ browser


def _chromium() -> Any:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


@contextlib.contextmanager
def study_page(server: ServerProcess, study_id: int) -> Iterator[tuple[Any, list[str]]]:
    """A study's dashboard page in headless Chromium (1200 x 900), with the page errors it
    raises collected."""
    with _chromium() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{server.url}/?study={study_id}#token={server.token}")
            yield page, errors
        finally:
            browser.close()


ROLES = (
    ["complete"] * 6 + ["pruned"] + ["complete"] * 6 + ["failed"] + ["complete"] * 3 + ["pruned"]
) + ["running"] * 3
COUNT = {role: ROLES.count(role) for role in set(ROLES)}


def seed_e2e(http: httpx.Client) -> tuple[int, dict[str, dict]]:
    """An ask/tell study driven over HTTP: complete, pruned, failed and running trials, each
    with a loss curve (the pruned ones cut off early)."""
    spec = simple_spec(
        "e2e-study",
        budget={"max_trials": 40},
        space={
            "x": {"type": "float", "low": -5.0, "high": 5.0},
            "lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
            "n": {"type": "int", "low": 1, "high": 4},
            "opt": {"type": "categorical", "choices": ["sgd", "adam"]},
        },
    )
    sid = create_spec(http, spec)
    roles = ROLES
    out: dict[str, dict] = {}
    for i, role in enumerate(roles):
        t = ask(http, sid)
        final = t["params"]["x"] ** 2 / 5 + 0.2 * abs(math.log10(t["params"]["lr"]) + 2)
        steps = 6 if role == "pruned" else 12 if role == "running" else 20
        curve = [(s, "loss", round(final + 2 * math.exp(-s / 5), 6)) for s in range(steps)]
        report(http, t["trial_id"], curve)
        if role == "complete":
            tell(http, t["trial_id"], value=curve[-1][2])
        elif role in ("pruned", "failed"):
            extra = {"error": "CUDA out of memory"} if role == "failed" else {}
            tell(http, t["trial_id"], state=role, **extra)
        out[f"{role}-{i}"] = {**t, "curve": curve}
    return sid, out


def chart_layers(page: Any, chart_id: str) -> Any:
    return page.evaluate(
        """id => document.getElementById(id).chart.spec.layers.map(l =>
            l.kind === 'points' ? l.data.map(p => [p.x, p.y])
          : l.kind === 'lines' ? l.series.map(s => ({pick: s.pick, end: s.end, points: s.points}))
          : l.points)""",
        chart_id,
    )


@pytest.mark.browser
def test_dashboard_end_to_end(sqlite_server: ServerProcess, tmp_path: Path) -> None:
    started = time.monotonic()
    http = sqlite_server.http()
    sid, seeded = seed_e2e(http)
    trials = {t["number"]: t for t in ok(http.get(f"{API}/studies/{sid}/trials"))["trials"]}
    running = [t for k, t in seeded.items() if k.startswith("running")]
    complete = sorted(
        (t for t in trials.values() if t["state"] == "complete"), key=lambda t: t["number"]
    )
    errors: list[str] = []
    with _chromium() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            # Without a token the page asks for one.
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(sqlite_server.url + "/")
            page.wait_for_selector("#token-dialog:not([hidden])")
            page.fill("#token-input", sqlite_server.token)
            page.click("#token-form button")
            page.wait_for_selector("table.studies tr[data-study]")
            page.close()

            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            api_answers: list[tuple[str, int]] = []
            page.on(
                "response",
                lambda r: api_answers.append((r.url, r.status)) if "/api/v1/" in r.url else None,
            )
            page.goto(f"{sqlite_server.url}/#token={sqlite_server.token}")

            # The studies list.
            row = page.wait_for_selector(f"tr[data-study='{sid}']")
            cells = [c.inner_text() for c in row.query_selector_all("td")]
            best = min(t["value"] for t in complete)
            expected = [str(COUNT["complete"] + COUNT["pruned"]), str(COUNT["running"]), "1", "40"]
            assert cells[:8] == ["e2e-study", "running", "random", *expected, _num(best)]
            assert page.evaluate("location.hash") == "", "the token left the address bar"

            # The study page, reached by its link.
            row.query_selector("a").click()
            page.wait_for_selector("#study-state .badge")
            wait_until(
                page,
                "n => document.querySelectorAll('table.trials tbody tr').length === n",
                len(ROLES),
            )
            wait_until(page, "() => document.getElementById('curves').dataset.points > 0")
            wait_until(page, "() => document.querySelector('#importance .imp-row') !== null")

            # History: each complete trial's value, and the best-so-far line.
            pruned_pts, complete_pts, best_line = chart_layers(page, "history")
            assert complete_pts == [[t["number"], t["value"]] for t in complete]
            running_best, expected_line = math.inf, []
            for t in complete:
                running_best = min(running_best, t["value"])
                expected_line.append([t["number"], running_best])
            assert best_line == expected_line
            assert len(pruned_pts) == COUNT["pruned"]

            # Curves: every trial's stored points; the pruned one ends in a cross.
            (series,) = chart_layers(page, "curves")
            by_trial = {s["pick"]: s for s in series}
            assert len(by_trial) == len(ROLES)
            for key, t in seeded.items():
                s = by_trial[t["trial_id"]]
                assert s["points"] == [[step, v] for step, _, v in t["curve"]], key
                role = key.split("-")[0]
                assert s["end"] == {"pruned": "cross", "running": "dot"}.get(role), key

            # The table: one row per trial, with its state and value.
            for t in trials.values():
                tr = page.query_selector(f"table.trials tr[data-number='{t['number']}']")
                text = tr.inner_text()
                assert t["state"] in text
                if t["state"] == "complete":
                    assert _num(t["value"]) in text

            # Parallel coordinates and importance are drawn from the same data.
            points = page.eval_on_selector("#parallel", "e => Number(e.dataset.points)")
            assert points == COUNT["complete"]
            names = page.eval_on_selector_all(
                "#importance .imp-row", "rs => rs.map(r => r.dataset.param)"
            )
            assert sorted(names) == ["lr", "n", "opt", "x"]

            # Screenshot for the README, while trials still run.
            page.wait_for_timeout(500)
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 20_000
            if os.environ.get("HPO_DASHBOARD_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["HPO_DASHBOARD_SCREENSHOT"])

            # Nothing changes: the polls answer 304 and no plot is drawn again.
            _wait_for_polls(page, api_answers, sid, 1)
            renders = page.evaluate("JSON.stringify(window.hpo.page.renders)")
            api_answers.clear()
            _wait_for_polls(page, api_answers, sid, 2)
            assert api_answers and all(status == 304 for _, status in api_answers), api_answers
            assert page.evaluate("JSON.stringify(window.hpo.page.renders)") == renders

            # A new metric point posted through the API appears without a reload.
            page.evaluate("window.notReloaded = true")
            target = running[0]["trial_id"]
            report(http, target, [(12, "loss", 0.123)])
            wait_until(
                page,
                """tid => document.getElementById('curves').chart.spec.layers[0].series
                    .some(s => s.pick === tid && s.points.at(-1)[0] === 12
                               && s.points.at(-1)[1] === 0.123)""",
                target,
            )
            assert page.evaluate("window.notReloaded") is True

            # The table sorts (by loss, ascending) and filters.
            page.click("table.trials th:text-is('loss')")
            rows = "table.trials tbody tr"
            lowest = min((t for t in trials.values() if t["value"] is not None), key=_value)
            assert page.get_attribute(rows, "data-number") == str(lowest["number"])
            adam = sum(t["params"]["opt"] == "adam" for t in trials.values())
            page.fill("input[aria-label=filter]", "opt=adam")
            wait_until(
                page, "n => document.querySelectorAll('table.trials tbody tr').length === n", adam
            )
            page.fill("input[aria-label=filter]", "")

            # A hidden tab does not poll; it catches up as soon as it shows again.
            _set_hidden(page, True)
            page.wait_for_timeout(500)
            api_answers.clear()
            page.wait_for_timeout(4000)
            assert api_answers == []
            _set_hidden(page, False)
            _wait_for_polls(page, api_answers, sid, 1)

            # A trial's detail: params, series, state history, attempts and error text.
            failed = next(t for k, t in seeded.items() if k.startswith("failed"))
            page.click(f"table.trials tr[data-trial='{failed['trial_id']}']")
            page.wait_for_selector("#detail pre.error")
            detail = page.inner_text("#detail")
            assert f"Trial #{failed['number']}" in detail and "CUDA out of memory" in detail
            assert "attempts" in detail and "running" in detail and "failed" in detail
            assert page.eval_on_selector("#detail .series", "e => Number(e.dataset.points)") == 20
            page.click("#detail .close")

            # Pause, then resume: the API sees each state.
            page.click("button.act-paused")
            page.wait_for_selector("#study-state .state-paused")
            assert ok(http.get(f"{API}/studies/{sid}"))["state"] == "paused"
            page.click("button.act-running")
            page.wait_for_selector("#study-state .state-running")
            assert ok(http.get(f"{API}/studies/{sid}"))["state"] == "running"
            assert not errors, errors
        finally:
            browser.close()
            http.close()
    assert time.monotonic() - started < 120


@pytest.mark.browser
def test_dashboard_shows_the_pareto_front(sqlite_server: ServerProcess) -> None:
    http = sqlite_server.http()
    spec = simple_spec(
        "two-objectives",
        objective=[
            {"metric": "err", "direction": "minimize"},
            {"metric": "cost", "direction": "minimize"},
        ],
    )
    sid = create_spec(http, spec)
    for err, cost in [(1.0, 1.0), (0.5, 2.0), (2.0, 0.5), (1.5, 1.5)]:
        tell(http, ask(http, sid)["trial_id"], values=[err, cost])
    http.close()
    with study_page(sqlite_server, sid) as (page, _):
        wait_until(page, "() => document.getElementById('pareto')?.dataset.points > 0")
        others, line, front = chart_layers(page, "pareto")
        assert sorted(front) == [[0.5, 2.0], [1.0, 1.0], [2.0, 0.5]]
        assert line == sorted(front), "the front is joined from left to right"
        assert others == [[1.5, 1.5]]


@pytest.mark.browser
def test_the_history_of_a_constrained_study_draws_the_best_among_feasible_trials(
    sqlite_server: ServerProcess,
) -> None:
    """acc maximised with latency <= 10: the best-so-far line went through the infeasible
    0.99 (latency 50) while the header said the best was 0.6. Trial lists now say which
    complete trials meet the constraints, and the line leaves the others out."""
    http = sqlite_server.http()
    spec = simple_spec(
        "constrained",
        objective={"metric": "acc", "direction": "maximize"},
        constraints=["latency <= 10"],
    )
    sid = create_spec(http, spec)
    for acc, latency in [(0.5, 5), (0.99, 50), (0.6, 8), (0.7, 30)]:
        t = ask(http, sid)
        report(http, t["trial_id"], [(1, "latency", latency)])
        tell(http, t["trial_id"], value=acc)
    running = ask(http, sid)["trial_id"]
    listed = ok(http.get(f"{API}/studies/{sid}/trials"))["trials"]
    assert [t["feasible"] for t in listed] == [True, False, True, False, None]
    assert listed[-1]["id"] == running
    assert ok(http.get(f"{API}/studies/{sid}"))["best_trial"]["value"] == 0.6
    http.close()
    with study_page(sqlite_server, sid) as (page, errors):
        wait_until(page, "() => document.getElementById('history')?.chart?.spec != null")
        pruned_pts, feasible_pts, best_line, infeasible_pts = chart_layers(page, "history")
        assert pruned_pts == [] and feasible_pts == [[0, 0.5], [2, 0.6]]
        assert [y for _, y in best_line] == [0.5, 0.6]
        assert infeasible_pts == [[1, 0.99], [3, 0.7]]
        assert errors == []


@pytest.mark.browser
def test_the_drawer_of_a_running_trial_follows_its_points_and_gets_over_an_error(
    sqlite_server: ServerProcess,
) -> None:
    """The drawer reloaded only when the trial's state moved: a running trial's new points
    and last step never showed. And one failed request left it saying "loading…" for good
    (it retried only from a redraw, which a quiet study never made)."""
    http = sqlite_server.http()
    sid = create(http, "drawer")
    tid = ask(http, sid)["trial_id"]
    report(http, tid, [(s, "loss", 1.0 / (s + 1)) for s in range(3)])
    with study_page(sqlite_server, sid) as (page, errors):
        page.wait_for_selector(f"table.trials tr[data-trial='{tid}']", timeout=15_000)
        failed = []

        def fail_once(route: Any) -> None:
            if not failed:
                failed.append(route.request.url)
                route.fulfill(status=503, body='{"message": "database unavailable"}')
            else:
                route.continue_()

        page.route(f"**/api/v1/trials/{tid}", fail_once)
        page.click(f"table.trials tr[data-trial='{tid}']")
        page.wait_for_selector("#detail .load-error", timeout=15_000)
        wait_until(page, "() => document.querySelector('#detail .series') !== null", timeout=30)
        assert failed and "last step2" in page.inner_text("#detail").replace("\t", "")
        report(http, tid, [(s, "loss", 1.0 / (s + 1)) for s in range(3, 40)])
        wait_until(
            page,
            "() => document.querySelector('#detail .series')?.dataset.points === '40'",
            timeout=30,
        )
        assert "last step39" in page.inner_text("#detail").replace("\t", "")
        assert errors == []
    http.close()


@pytest.mark.browser
@pytest.mark.parametrize("max_steps", [9, None])
def test_dashboard_shows_paused_trials_and_their_rungs(
    sqlite_server: ServerProcess, max_steps: int | None
) -> None:
    """Promotion ASHA over ask/tell: three trials pause at rung 1 (step 1), the best is
    promoted and pauses at rung 2 (step 3). The page counts and filters paused trials and
    its rungs card says how many reached, wait at and went on from each rung (the card was
    hidden for ASHA without max_steps: it computed Hyperband's brackets from it)."""
    http = sqlite_server.http()
    pruner = {"type": "asha", "mode": "promotion", "min_steps": 1, "reduction_factor": 3}
    if max_steps is not None:
        pruner["max_steps"] = max_steps
    sid = create_spec(http, simple_spec("promo", pruner=pruner))
    first = [ask(http, sid)["trial_id"] for _ in range(3)]
    for tid, loss in zip(first, (0.5, 0.3, 0.9), strict=True):
        report(http, tid, [(1, "loss", loss)])
    promoted = ask(http, sid)
    assert promoted["trial_id"] == first[1], "the best of rung 1 is promoted, no new trial"
    points = [{"step": s, "name": "loss", "value": v} for s, v in ((2, 0.25), (3, 0.2))]
    resumed = http.post(  # its second attempt: the attempt's token says which
        f"{API}/trials/{first[1]}/metrics",
        json={"points": points},
        headers={"Authorization": f"Bearer {promoted['attempt_token']}"},
    )
    assert resumed.status_code == 200 and resumed.json()["should_stop"], resumed.text
    states = {t["id"]: t["state"] for t in ok(http.get(f"{API}/studies/{sid}/trials"))["trials"]}
    assert sorted(states.values()) == ["paused"] * 3
    http.close()
    with study_page(sqlite_server, sid) as (page, errors):
        page.wait_for_selector("#card-rungs:not([hidden]) table.rungs tbody tr")
        rows = page.eval_on_selector_all(
            "table.rungs tbody tr",
            "rows => rows.map(r => [...r.cells].map(c => c.textContent))",
        )
        # rung, step, reached, paused here, went on, top floor(n/eta)
        assert rows == [["0", "1", "3", "2", "1", "1"], ["1", "3", "1", "1", "0", "0"]]
        assert "3 paused" in page.inner_text(".study-head")
        badges = page.eval_on_selector_all("table.trials .badge", "b => b.map(x => x.textContent)")
        assert badges == ["paused"] * 3
        assert errors == []


@pytest.mark.browser
def test_data_that_broke_the_page_is_drawn(sqlite_server: ServerProcess) -> None:
    """Found by a hostile review: two values one rounding apart (0.3 and 0.1 + 0.2) hung
    the page in its axis ticks (30-44 s per draw, then an error, again at every poll); a
    trial with thousands of metric names froze its drawer (a chart each); a parameter named
    ``toString`` read as set where it was inactive. The page now draws them in time."""
    http = sqlite_server.http()
    space = {
        "x": {"type": "float", "low": 0.0, "high": 1.0},
        "opt": {"type": "categorical", "choices": ["a", "b"]},
        "toString": {"type": "int", "low": 1, "high": 4, "when": {"opt": ["a"]}},
    }
    sid = create_spec(http, {**simple_spec("edge-values"), "space": space})
    fixed = ({"x": 0.5, "opt": "b"}, {"x": 0.6, "opt": "a", "toString": 2})
    for params, value in zip(fixed, (0.3, 0.1 + 0.2), strict=True):
        r = http.post(f"{API}/studies/{sid}/ask", json={"params": params})
        assert r.status_code == 201, r.text
        tell(http, r.json()["trial_id"], value=value)
    many = ask(http, sid)["trial_id"]  # running, with 60 metric names
    report(http, many, [(s, f"m{k:02d}", 1.0 / (s + 1)) for k in range(60) for s in range(2)])
    http.close()
    with study_page(sqlite_server, sid) as (page, errors):
        page.wait_for_selector("table.trials tbody tr", timeout=15_000)
        wait_until(page, "() => document.getElementById('history')?.chart?.spec != null")
        headers = page.eval_on_selector_all(
            "table.trials thead th", "h => h.map(x => x.textContent)"
        )
        column = next(i for i, h in enumerate(headers) if h.startswith("toString"))
        cells = page.eval_on_selector_all(
            "table.trials tbody tr",
            "(rows, c) => rows.map(r => [r.dataset.number, r.cells[c].textContent])",
            column,
        )
        assert dict(cells) == {"0": "-", "1": "2", "2": "-"}, cells
        page.click(f"table.trials tr[data-trial='{many}']")
        page.wait_for_selector("#detail .more-metrics", timeout=15_000)
        assert len(page.query_selector_all("#detail .series")) == 50
        assert page.inner_text("#detail .more-metrics").startswith("10 more metrics")
        assert errors == []


@pytest.mark.browser
def test_axes_tell_apart_what_json_tells_apart_and_reach_the_largest_floats(
    sqlite_server: ServerProcess,
) -> None:
    """A category axis put 3 and "3" on one place (and left a slot empty); a null choice was
    drawn as an inactive parameter; values near ±1e308 overflowed the axis span and every
    point fell on one edge; sorting a value column put the trials with no value first."""
    http = sqlite_server.http()
    space = {"c": {"type": "categorical", "choices": [None, 3, "3", "adam"]}}
    sid = create_spec(http, {**simple_spec("axes"), "space": space})
    for params, value in (({"c": None}, 1e308), ({"c": 3}, -1e308), ({"c": "3"}, 0.5)):
        r = http.post(f"{API}/studies/{sid}/ask", json={"params": params})
        tell(http, r.json()["trial_id"], value=value)
    ask(http, sid)  # running: no value
    http.close()
    with study_page(sqlite_server, sid) as (page, errors):
        page.wait_for_selector("table.trials tbody tr", timeout=15_000)
        mapped = page.evaluate(
            """async () => {
                const { Scale } = await import('/static/js/plot.js');
                const c = new Scale('category', [null, 3, '3', 'adam'], [0, 400]);
                const y = new Scale('linear', [-1e308, 1e308], [0, 100]);
                return [[null, 3, '3', 'adam'].map(v => c.map(v)), [y.map(-1e308), y.map(0),
                        y.map(1e308)]];
            }"""
        )
        assert mapped == [[50, 150, 250, 350], [0, 50, 100]]
        value_col = page.eval_on_selector_all(
            "table.trials thead th", "h => h.findIndex(x => x.textContent.startsWith('loss'))"
        )
        for _ in range(2):  # ascending, then descending: the running trial last both times
            page.click(f"table.trials thead th:nth-child({value_col + 1})")
            last = page.eval_on_selector(
                "table.trials tbody tr:last-child", "r => r.querySelector('.badge').textContent"
            )
            assert last == "running"
        # the keyboard: a header sorts on Enter, a row opens its trial, Escape-free close
        page.focus(f"table.trials thead th:nth-child({value_col + 1})")
        page.keyboard.press("Enter")
        assert (
            page.eval_on_selector(
                f"table.trials thead th:nth-child({value_col + 1})",
                "h => h.getAttribute('aria-sort')",
            )
            == "ascending"
        )
        page.focus("table.trials tbody tr:first-child")
        page.keyboard.press("Enter")
        page.wait_for_selector("#detail:not([hidden]) .drawer-head", timeout=15_000)
        assert page.evaluate("() => document.activeElement.classList.contains('close')")
        page.keyboard.press("Enter")  # the close button
        wait_until(page, "() => document.getElementById('detail').hidden")
        assert page.evaluate("() => document.activeElement.tagName") == "TR"
        assert errors == []


@pytest.mark.browser
def test_dashboard_shows_the_pbt_lineage(sqlite_server: ServerProcess, tmp_path: Path) -> None:
    """A PBT study whose worst trial copied the best at step 2 (driven through the core with a
    fake executor on the server's database): the lineage card lists the copy (who, from whom,
    at which step, how the learning rate was explored) and plots lr over each trial's steps."""
    from hpo.service.db.engine import make_engine
    from hpo.service.storage import Storage
    from hpo.service.studies import StudyService
    from tests.service.test_pbt import first_copy

    engine = make_engine(sqlite_server.database_url)
    try:
        service = StudyService(Storage(engine))
        run = first_copy(service, tmp_path / "checkpoints", "lineage")
        run.executor.finish(run.worst)
        run.scheduler.tick()
        run.scheduler.release()
        copied = service.storage.get_trial(run.worst.trial_id)
        donor = service.storage.get_trial(run.best.trial_id)
    finally:
        engine.dispose()
    (segment,) = copied.schedule[1:]
    with study_page(sqlite_server, run.study_id) as (page, errors):
        page.wait_for_selector("#card-lineage:not([hidden]) table.lineage tbody tr")
        rows = page.eval_on_selector_all(
            "table.lineage tbody tr",
            "rows => rows.map(r => [...r.cells].map(c => c.textContent))",
        )
        explored = f"lr {segment.perturbed['lr']}"
        assert [r[:4] for r in rows] == [
            [f"#{copied.number}", "2", f"#{donor.number} at step 2", explored]
        ]
        assert f"x={float(format(donor.params['x'], '.4g'))!r}" in rows[0][4]  # copied
        assert page.eval_on_selector("#card-lineage select", "s => s.value") == "lr"
        assert page.eval_on_selector("#card-lineage canvas", "c => c.width") > 0
        assert page.eval_on_selector("#card-rungs", "c => c.hidden")
        assert errors == []


@pytest.mark.browser
def test_dashboard_shows_a_replayed_schedule(sqlite_server: ServerProcess, tmp_path: Path) -> None:
    """A replay study whose trial paused at step 2 and resumed with the schedule's next
    learning rate (driven through the core with a fake executor on the server's database):
    the card is titled for a replay and lists the change, with no trial copied."""
    from hpo.service.db.engine import make_engine
    from hpo.service.executor import AttemptRef
    from hpo.service.storage import Storage
    from hpo.service.studies import StudyService
    from tests.service.test_pbt import launch
    from tests.service.test_promotion import report, save
    from tests.service.test_replay import SCHEDULE, replay_spec

    engine = make_engine(sqlite_server.database_url)
    try:
        service = StudyService(Storage(engine))
        folder = tmp_path / "checkpoints"
        run = launch(service, folder, replay_spec("replayed", SCHEDULE), cpus=1)
        (ref,) = run.refs
        assert report(service, ref.trial_id, 2, 0.8) is True
        save(service, run.executor, ref, folder, 2)
        run.executor.finish(ref)
        run.scheduler.tick()
        run.scheduler.release()
        assert AttemptRef(ref.trial_id, 2) in run.executor.launch_of
    finally:
        engine.dispose()
    with study_page(sqlite_server, run.study_id) as (page, errors):
        page.wait_for_selector("#card-lineage:not([hidden]) table.lineage tbody tr")
        assert page.inner_text("#card-lineage h2") == "Replayed schedule"
        rows = page.eval_on_selector_all(
            "table.lineage tbody tr",
            "rows => rows.map(r => [...r.cells].map(c => c.textContent))",
        )
        assert [r[:4] for r in rows] == [["#0", "2", "— (replayed)", "—"]]
        assert "lr=0.05" in rows[0][4] and "x=0.5" in rows[0][4]
        assert page.eval_on_selector("#card-lineage canvas", "c => c.width") > 0
        assert errors == []


def seed_many(database_url: str, n: int, steps: int) -> dict[str, int]:
    """An ask/tell study of ``n`` trials with ``steps`` loss points each (every 10th pruned
    after a third of them, every 25th failed), written through the core on the server's
    database: the same ask, report and tell the API runs, minutes faster than over HTTP."""
    from hpo.service.db.engine import make_engine
    from hpo.service.spec import StudySpec
    from hpo.service.storage import Storage
    from hpo.service.studies import MetricInput, StudyService

    engine = make_engine(database_url)
    service = StudyService(Storage(engine))
    space = {
        "x": {"type": "float", "low": -5.0, "high": 5.0},
        "lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
        "opt": {"type": "categorical", "choices": ["sgd", "adam"]},
    }
    sid = service.create_study(StudySpec.model_validate(simple_spec("many", space=space))).id
    count = {"complete": 0, "pruned": 0, "failed": 0}
    try:
        for i in range(n):
            t = service.ask(sid)
            final = t.params["x"] ** 2 + abs(math.log10(t.params["lr"]) + 2)
            role = "failed" if i % 25 == 0 else "pruned" if i % 10 == 0 else "complete"
            last = steps // 3 if role == "pruned" else steps
            curve = [MetricInput(s, "loss", final + 2 * math.exp(-s / 20)) for s in range(last)]
            service.report(t.id, curve)
            if role == "complete":
                service.tell(t.id, value=final)
            else:
                service.tell(t.id, state=role)
            count[role] += 1
    finally:
        engine.dispose()
    return {"id": sid, **count}


@pytest.mark.slow
@pytest.mark.browser
def test_dashboard_with_thousands_of_trials(sqlite_server: ServerProcess) -> None:
    """Over a thousand trials: every panel draws, the table keeps one page of rows in the DOM
    with the count of all, and a poll of the unchanged study is one 304."""
    n = 1050
    seeded = seed_many(sqlite_server.database_url, n, steps=30)
    sid = seeded["id"]
    errors: list[str] = []
    with _chromium() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            answers: list[tuple[str, int]] = []
            page.on("response", lambda r: answers.append((r.url, r.status)))
            page.goto(f"{sqlite_server.url}/?study={sid}#token={sqlite_server.token}")
            done = "() => window.hpo.page.unfinished === false && !window.hpo.page.poller.busy"
            importance = "() => document.querySelector('#importance .imp-row') !== null"
            wait_until(page, importance, timeout=60)
            wait_until(page, done, timeout=60)
            assert page.is_hidden("#banner"), page.inner_text("#banner")

            _, complete_pts, _ = chart_layers(page, "history")
            assert len(complete_pts) == seeded["complete"]
            (series,) = chart_layers(page, "curves")
            assert len(series) == n
            pruned = [s for s in series if s["end"] == "cross"]
            assert len(pruned) == seeded["pruned"] and all(len(s["points"]) == 10 for s in pruned)
            drawn = page.eval_on_selector("#curves", "e => Number(e.dataset.points)")
            assert drawn == sum(len(s["points"]) for s in series)
            assert (
                page.eval_on_selector("#parallel", "e => Number(e.dataset.points)")
                == (seeded["complete"])
            )
            # The contour is asked without its points; the page draws its own trials on it.
            assert any("/contour?" in u and "points=false" in u for u, _ in answers)
            _, trials_on_top, _ = chart_layers(page, "contour")
            assert len(trials_on_top) == seeded["complete"]
            assert page.evaluate("document.getElementById('contour').chart.spec.layers[0].z.length")

            # The table: one page of rows in the DOM, the count of all of them.
            rows = "table.trials tbody tr"
            info = "#trials .controls .muted"
            assert page.eval_on_selector_all(rows, "rs => rs.length") == 50
            assert page.inner_text(info) == f"1–50 of {n} (of {n})"
            page.click("text=next ›")
            assert page.inner_text(info) == f"51–100 of {n} (of {n})"
            page.fill("input[aria-label=filter]", "state=pruned")
            wait_until(
                page,
                "t => document.querySelector('#trials .controls .muted').textContent === t",
                f"1–50 of {seeded['pruned']} (of {n})",
            )
            assert page.eval_on_selector_all(rows, "rs => rs.length") == 50

            # Nothing changed: the next poll is a single 304.
            _wait_for_polls(page, answers, sid, 1)
            answers.clear()
            _wait_for_polls(page, answers, sid, 1)
            api = [(u, status) for u, status in answers if "/api/v1/" in u]
            assert api and all(status == 304 for _, status in api), api

            # Axis ranges come without spreading the values into Math.min: 3,000 trials' curves
            # hold 150,000 points, which overflowed the call stack and stopped the page.
            lo_hi = page.evaluate(
                """async () => {
                    const { extent } = await import('/static/js/plot.js');
                    return extent(Array.from({ length: 500000 }, (_, i) => i), 'linear');
                }"""
            )
            assert lo_hi[0] < 0 and lo_hi[1] > 499_999

            # Past 2,000 curves each is drawn from at most 40 of its points (the first, the
            # last, each run's lowest and highest): drawing is the page's dear part there.
            drawn = page.evaluate(
                """async () => {
                    const { curves, thinned } = await import('/static/js/panels.js');
                    const steps = Array.from({ length: 120 }, (_, i) => i);
                    const values = steps.map((s) => Math.sin(s / 7) + (s === 53) - (s === 88));
                    const model = (n) => ({
                        metric: 'loss',
                        trials: new Map(),
                        curves: new Map(Array.from({ length: n }, (_, i) => [i, {
                            trial_id: i, number: i, state: 'complete', steps, values, n: 120,
                        }])),
                    });
                    const longest = (n) =>
                        Math.max(...curves(model(n)).layers[0].series.map((s) => s.points.length));
                    return {
                        kept: thinned(steps, values, 40),
                        whole: thinned(steps.slice(0, 30), values.slice(0, 30), 40).length,
                        at2000: longest(2000),
                        at2001: longest(2001),
                    };
                }"""
            )
            kept = drawn["kept"]
            assert 20 <= len(kept) <= 40 and kept[0] == [0, 0] and kept[-1][0] == 119
            assert [k[0] for k in kept] == sorted({k[0] for k in kept})  # in step order, once
            assert {53, 88} <= {k[0] for k in kept}  # the highest and the lowest point
            assert drawn["whole"] == 30
            assert (drawn["at2000"], drawn["at2001"]) == (120, 40)

            # A study past 2,000 trials (here asked for in the address) first shows the best
            # 1,000 complete trials' curves and the unfinished, in one request, and says so;
            # "show all" fetches every curve.
            answers.clear()
            page.goto(f"{sqlite_server.url}/?study={sid}&curves=best#token={sqlite_server.token}")
            wait_until(page, "() => !document.getElementById('curves-note').hidden", timeout=60)
            wait_until(page, done, timeout=60)
            asked = [u for u, _ in answers if f"/studies/{sid}/curves" in u]
            assert len(asked) == 1 and "best=1000" in asked[0] and "objective=0" in asked[0]
            (series,) = chart_layers(page, "curves")
            assert len(series) == seeded["complete"]  # all of them: fewer than 1,000
            assert not [s for s in series if s["end"] == "cross"]  # no pruned trial
            note = page.inner_text("#curves-note")
            complete = f"{seeded['complete']:,}"
            assert note.startswith(
                f"{complete} of {n:,} trials: the best {complete} complete by loss"
            )
            page.click("#curves-note a")
            wait_until(
                page,
                "n => document.getElementById('curves').chart.spec.layers[0].series.length === n",
                n,
                timeout=60,
            )
            assert page.is_hidden("#curves-note")
            assert "curves=all" in page.url  # a reload shows them all too
            (series,) = chart_layers(page, "curves")
            assert len([s for s in series if s["end"] == "cross"]) == seeded["pruned"]
            assert not errors, errors
        finally:
            browser.close()


def wait_until(page: Any, script: str, arg: Any = None, timeout: float = 15) -> None:
    """Call the JavaScript function ``script`` with ``arg`` in the page until it is true.

    (Playwright's own ``wait_for_function`` evaluates strings with ``eval``, which the page's
    Content-Security-Policy forbids.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(script, arg):
        assert time.monotonic() < deadline, f"timed out waiting for {script}"
        page.wait_for_timeout(100)


def _num(v: float) -> str:
    """The dashboard's number format (4 significant digits)."""
    return f"{float(f'{v:.4g}'):g}" if 1e-3 <= abs(v) < 1e6 else f"{v:.2e}"


def _wait_for_polls(page: Any, answers: list, sid: int, n: int) -> None:
    """Wait until the page has polled the study ``n`` more times."""
    study = f"/api/v1/studies/{sid}"
    start = sum(1 for url, _ in answers if url.endswith(study))
    deadline = time.monotonic() + 15
    while sum(1 for url, _ in answers if url.endswith(study)) < start + n:
        assert time.monotonic() < deadline, "the page stopped polling"
        page.wait_for_timeout(200)
    page.wait_for_timeout(300)  # let that poll's follow-up requests land


def _value(t: dict) -> float:
    return t["value"]


def _set_hidden(page: Any, hidden: bool) -> None:
    """Pretend the tab was hidden (or shown again)."""
    page.evaluate(
        """hidden => {
            Object.defineProperty(document, 'hidden', {configurable: true, get: () => hidden});
            document.dispatchEvent(new Event('visibilitychange'));
        }""",
        hidden,
    )


@pytest.mark.browser
def test_a_curves_page_of_the_old_metric_that_comes_after_a_switch_is_dropped(
    sqlite_server: ServerProcess,
) -> None:
    """The user switches the curves to another metric while a page of the old one is on its
    way: that page, when it comes, neither switches the metric back nor mixes its curves in
    (it did both before)."""
    with sqlite_server.http() as http:
        sid = create(http, "switch")
        tid = ask(http, sid)["trial_id"]
        report(http, tid, [(s, "loss", 1 / (s + 1)) for s in range(5)])
        report(http, tid, [(s, "acc", 0.5 + s / 10) for s in range(5)])
        with study_page(sqlite_server, sid) as (page, errors):
            loaded = "() => window.hpo.page?.unfinished === false && !window.hpo.page.poller.busy"
            wait_until(page, loaded)
            assert page.evaluate("window.hpo.page.metric") == "loss"
            # From now on every answer of a loss curves page is held 1.5 s.
            page.evaluate(
                """() => {
                  const real = window.fetch;
                  window.held = 0;
                  window.fetch = async (...args) => {
                    const answer = await real(...args);
                    const url = String(args[0]);
                    if (url.includes('/curves') && !url.includes('metric=acc')) {
                      window.held += 1;
                      await new Promise((ok) => setTimeout(ok, 1500));
                    }
                    return answer;
                  };
                }"""
            )
            report(http, tid, [(5, "loss", 0.1)])  # the next poll asks for loss curves
            wait_until(page, "() => window.held > 0")
            page.select_option("select[aria-label=metric]", "acc")
            last_acc = """() => {
              const series = document.getElementById('curves').chart.spec.layers[0].series;
              return series.length === 1 && Math.abs(series[0].points.at(-1)[1] - 0.9) < 1e-9;
            }"""
            wait_until(page, last_acc)
            page.wait_for_timeout(2500)  # the held loss page has come by now
            assert page.evaluate("window.hpo.page.metric") == "acc"
            assert page.evaluate(last_acc)
            assert page.eval_on_selector("select[aria-label=metric]", "s => s.value") == "acc"
            assert errors == []


@pytest.mark.browser
def test_a_page_started_while_the_last_ones_poll_was_on_its_way_shows_the_study(
    sqlite_server: ServerProcess,
) -> None:
    """A study page is started anew (the token entered again) while the old page's poll of
    the study is on its way, and the new page's first poll fails. The old poll's answer lands
    after the new page forgot every ETag; the new page, holding nothing, must still ask for
    the whole study (it sent that ETag, got 304 and stayed empty before)."""
    with sqlite_server.http() as http:
        sid = create(http, "restart")
        tid = ask(http, sid)["trial_id"]
        report(http, tid, [(s, "loss", 1 / (s + 1)) for s in range(3)])
        with study_page(sqlite_server, sid) as (page, errors):
            loaded = "() => window.hpo.page?.unfinished === false && !window.hpo.page.poller.busy"
            wait_until(page, loaded)
            old = page.evaluate_handle("window.hpo.page")
            ask(http, sid)  # the study changes: the old page's poll gets a new ETag
            page.evaluate(
                """(sid) => {
                  const real = window.fetch;
                  const study = new RegExp(`/api/v1/studies/${sid}$`);
                  window.held = 0;
                  window.failed = 0;
                  window.fetch = async (...args) => {
                    const url = String(args[0]);
                    if (study.test(url) && window.held === 0) {  // the old page's poll
                      window.held += 1;
                      const answer = await real(...args);
                      await new Promise((ok) => setTimeout(ok, 1500));
                      return answer;
                    }
                    if (study.test(url) && window.failed === 0) {  // the new page's first
                      window.failed += 1;
                      throw new TypeError("Failed to fetch");
                    }
                    return real(...args);
                  };
                  window.hpo.page.poller.now();
                }""",
                sid,
            )
            wait_until(page, "() => window.held > 0")
            page.evaluate(
                """(token) => {
                  document.getElementById('token-input').value = token;
                  document.getElementById('token-form').requestSubmit();
                }""",
                sqlite_server.token,
            )
            wait_until(page, "() => window.failed > 0")
            assert page.evaluate("(old) => window.hpo.page !== old", old)
            wait_until(
                page,
                "() => window.hpo.page.study !== null && window.hpo.page.trials.size === 2",
                timeout=15,
            )
            assert page.evaluate("window.hpo.page.study.name") == "restart"
            assert errors == []


@pytest.mark.browser
@pytest.mark.ray
def test_the_study_page_says_why_the_trials_of_its_trainable_wait(tmp_path: Path) -> None:
    # the scheduler's local Ray cannot start (a 10 TB object store): the trials never start
    env = {"HPO_RAY_OBJECT_STORE_MB": str(10**7), "HPO_SCHEDULER_INTERVAL_S": "0.2"}
    with ServerProcess(f"sqlite:///{tmp_path / 'hpo.db'}", tmp_path, env) as server:
        with server.http() as http:
            spec = simple_spec(
                "waits-for-ray",
                budget={"max_trials": 1},
                resources={"workers_per_trial": 1, "cpus_per_worker": 1},
                trainable={"name": "synthetic"},
                space={"x": {"type": "float", "low": -1.0, "high": 1.0}},
            )
            sid = create_spec(http, spec)
            wait_for(lambda: http.get("/healthz").json()["executor_failure"], 60, "the failure")
            asked = create(http, "ask-tell")  # no trainable: nothing to say on its page
        with study_page(server, sid) as (page, errors):
            page.wait_for_selector("#notice:not([hidden])", timeout=30_000)
            text = page.inner_text("#notice")
            assert "cannot start or reach Ray" in text and "object store" in text, text
            assert errors == []
        with study_page(server, asked) as (page, errors):
            page.wait_for_selector(".study-head")
            page.wait_for_timeout(4000)  # a second tick, which would have asked
            assert page.is_hidden("#notice") and errors == []


@pytest.mark.browser
def test_the_study_page_says_when_no_server_runs_the_scheduler(
    sqlite_server: ServerProcess,
) -> None:
    server = sqlite_server  # started with HPO_SCHEDULER=false: nobody runs the scheduler
    with server.http() as http:
        spec = simple_spec("needs-a-scheduler", trainable={"name": "synthetic"})
        spec["space"] = {"x": {"type": "float", "low": -1.0, "high": 1.0}}
        sid = create_spec(http, spec)
        with study_page(server, sid) as (page, errors):
            page.wait_for_selector("#notice:not([hidden])", timeout=30_000)
            assert "No hpo serve of this database runs the scheduler" in page.inner_text("#notice")
            # the study is paused: it waits for nothing, and the page says nothing
            assert ok(http.patch(f"{API}/studies/{sid}", json={"state": "paused"}))
            page.wait_for_selector("#notice", state="hidden", timeout=30_000)
            assert errors == []
