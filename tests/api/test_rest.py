"""The REST contract over real HTTP: ``hpo serve`` in a subprocess, on SQLite and PostgreSQL.

Every request goes through httpx to the served app, so routing, validation, error mapping,
auth and the lease sweeper are all exercised as a deployed client would see them.
"""

from __future__ import annotations

import csv
import io
import json
import time
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, simple_spec

API = "/api/v1"
JSON = {"content-type": "application/json"}

CONTRACT_PATHS = {
    "/api/v1/studies",
    "/api/v1/studies/{study_id}",
    "/api/v1/studies/{study_id}/ask",
    "/api/v1/studies/{study_id}/trials",
    "/api/v1/studies/{study_id}/best",
    "/api/v1/studies/{study_id}/export.csv",
    "/api/v1/trials/{trial_id}",
    "/api/v1/trials/{trial_id}/tell",
    "/api/v1/trials/{trial_id}/metrics",
    "/healthz",
}


# ------------------------------------------------------------------ helpers


def create(http: httpx.Client, name: str = "s", **over: Any) -> dict:
    r = http.post(f"{API}/studies", json=simple_spec(name, **over))
    assert r.status_code == 201, r.text
    return r.json()


def ask(http: httpx.Client, sid: int) -> dict:
    r = http.post(f"{API}/studies/{sid}/ask")
    assert r.status_code == 201, r.text
    return r.json()


def tell(http: httpx.Client, tid: int, **body: Any) -> httpx.Response:
    return http.post(f"{API}/trials/{tid}/tell", json=body)


def report(http: httpx.Client, tid: int, step: int, value: float, name: str = "loss") -> bool:
    r = http.post(
        f"{API}/trials/{tid}/metrics",
        json={"points": [{"step": step, "name": name, "value": value}]},
    )
    assert r.status_code == 200, r.text
    return r.json()["should_stop"]


def get_study(http: httpx.Client, sid: int) -> dict:
    r = http.get(f"{API}/studies/{sid}")
    assert r.status_code == 200, r.text
    return r.json()


def get_trial(http: httpx.Client, tid: int) -> dict:
    r = http.get(f"{API}/trials/{tid}")
    assert r.status_code == 200, r.text
    return r.json()


def all_studies(http: httpx.Client) -> list[dict]:
    r = http.get(f"{API}/studies", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return r.json()["studies"]


def assert_error(
    r: httpx.Response, status: int, *, code: str | None = None, field: str | None = None
) -> dict:
    """A JSON error body with the given status (and error code / field)."""
    assert r.status_code == status, f"{r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) >= {"error", "message", "field"}, body
    assert body["message"], body
    if code is not None:
        assert body["error"] == code, body
    if field is not None:
        assert body["field"] == field, body
    if body["field"]:  # named once, first: not "pruner.type: pruner.type: ..."
        assert not body["message"].startswith(f"{body['field']}: {body['field']}:"), body
    return body


def is_sqlite(server: ServerProcess) -> bool:
    return server.database_url.startswith("sqlite")


# ------------------------------------------------- system, auth and studies


def check_system_endpoints_need_no_token(server: ServerProcess) -> None:
    r = httpx.get(server.url + "/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["database"] == ("sqlite" if is_sqlite(server) else "postgresql")

    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = httpx.get(server.url + "/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    assert set(paths) >= CONTRACT_PATHS, CONTRACT_PATHS - set(paths)
    assert {"post", "get"} <= set(paths["/api/v1/studies"])
    assert {"get", "patch", "delete"} <= set(paths["/api/v1/studies/{study_id}"])
    assert {"post", "get"} <= set(paths["/api/v1/trials/{trial_id}/metrics"])


def check_missing_or_wrong_token_is_401(server: ServerProcess) -> None:
    with server.http() as http:
        sid = create(http, "auth")["id"]
    anonymous = httpx.Client(base_url=server.url, timeout=30)
    with anonymous, server.http(token="not-the-token") as wrong:
        for client in (anonymous, wrong):
            for method, path, body in [
                ("GET", f"{API}/studies", None),
                ("GET", f"{API}/studies/{sid}", None),
                ("POST", f"{API}/studies", simple_spec("intruder")),
                ("POST", f"{API}/studies/{sid}/ask", None),
                ("PATCH", f"{API}/studies/{sid}", {"state": "stopped"}),
                ("DELETE", f"{API}/studies/{sid}", None),
            ]:
                r = client.request(method, path, json=body)
                err = assert_error(r, 401, code="unauthorized")
                assert "token" in err["message"]
                assert r.headers.get("www-authenticate") == "Bearer"
    with server.http() as http:
        studies = all_studies(http)
        assert [s["name"] for s in studies] == ["auth"]
        assert studies[0]["state"] == "running" and studies[0]["n_trials"] == 0


def check_create_get_and_list_studies_with_pagination(http: httpx.Client) -> None:
    r = http.post(f"{API}/studies", json=simple_spec("first", budget={"max_trials": 7}))
    assert r.status_code == 201, r.text
    created = r.json()
    assert isinstance(created["id"], int)
    assert r.headers["location"] == f"{API}/studies/{created['id']}"

    got = http.get(r.headers["location"]).json()
    assert got["id"] == created["id"] and got["name"] == "first"
    assert got["state"] == "running"
    assert got["spec"]["space"]["x"] == {
        "type": "float",
        "low": -5.0,
        "high": 5.0,
        "log": False,
        "step": None,
        "values": None,
        "when": None,
        "mutable": False,
    }
    assert got["spec"]["sampler"]["type"] == "random"
    assert got["spec"]["budget"]["max_trials"] == 7
    assert got["directions"] == ["minimize"]
    assert got["counts"] == {
        "waiting": 0,
        "running": 0,
        "paused": 0,
        "complete": 0,
        "pruned": 0,
        "failed": 0,
    }
    assert got["n_trials"] == 0 and got["best_trial"] is None

    ids = [created["id"]] + [create(http, f"page{i}")["id"] for i in range(4)]
    newest_first = [s["id"] for s in all_studies(http)]
    assert newest_first == sorted(newest_first, reverse=True) and set(ids) <= set(newest_first)

    pages, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        page = http.get(f"{API}/studies", params=params).json()
        pages.append([s["id"] for s in page["studies"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(pages) >= 3
    assert pages == [newest_first[i : i + 2] for i in range(0, len(newest_first), 2)]

    for sid in ids[1:3]:
        assert http.patch(f"{API}/studies/{sid}", json={"state": "paused"}).status_code == 200
    paused = http.get(f"{API}/studies", params={"state": "paused"}).json()
    assert sorted(s["id"] for s in paused["studies"]) == sorted(ids[1:3])
    assert paused["next_cursor"] is None
    newest_running = max(s["id"] for s in all_studies(http) if s["state"] == "running")
    running = http.get(f"{API}/studies", params={"state": "running", "limit": 1}).json()
    assert [s["id"] for s in running["studies"]] == [newest_running]
    assert running["next_cursor"] == newest_running

    by_name = http.get(f"{API}/studies", params={"name": "page2"}).json()["studies"]
    assert [s["id"] for s in by_name] == [ids[3]]

    assert_error(http.get(f"{API}/studies", params={"state": "bogus"}), 422, field="query.state")
    assert_error(http.get(f"{API}/studies", params={"limit": 0}), 422, field="query.limit")


def check_study_etag_and_if_none_match(http: httpx.Client) -> None:
    sid = create(http, "etag")["id"]
    first = http.get(f"{API}/studies/{sid}")
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')

    cached = http.get(f"{API}/studies/{sid}", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    assert cached.headers["etag"] == etag

    ask(http, sid)
    changed = http.get(f"{API}/studies/{sid}", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.json()["counts"]["running"] == 1
    new_etag = changed.headers["etag"]
    assert new_etag != etag
    again = http.get(f"{API}/studies/{sid}", headers={"If-None-Match": f'"x", {new_etag}'})
    assert again.status_code == 304


def test_system_auth_and_studies(server: ServerProcess, subtests: pytest.Subtests) -> None:
    """/healthz, /docs and /openapi.json need no token; the API answers 401 JSON without one;
    studies are created, read, listed page by page and cached by ETag."""
    with subtests.test("system endpoints"):
        check_system_endpoints_need_no_token(server)
    with subtests.test("auth"):
        check_missing_or_wrong_token_is_401(server)
    with server.http() as http:
        with subtests.test("create, get, list, paginate"):
            check_create_get_and_list_studies_with_pagination(http)
        with subtests.test("ETag and If-None-Match"):
            check_study_etag_and_if_none_match(http)


def check_patch_pause_resume_stop(http: httpx.Client) -> None:
    sid = create(http, "control")["id"]
    first = ask(http, sid)

    r = http.patch(f"{API}/studies/{sid}", json={"state": "paused"})
    assert r.status_code == 200 and r.json()["state"] == "paused"
    err = assert_error(http.post(f"{API}/studies/{sid}/ask"), 409, code="study_not_running")
    assert "paused" in err["message"]
    assert get_study(http, sid)["n_trials"] == 1
    # a running trial may still finish while the study is paused
    assert report(http, first["trial_id"], 0, 1.0) is False

    r = http.patch(f"{API}/studies/{sid}", json={"state": "running"})
    assert r.status_code == 200 and r.json()["state"] == "running"
    second = ask(http, sid)
    assert second["number"] == 1

    r = http.patch(f"{API}/studies/{sid}", json={"state": "stopped"})
    assert r.status_code == 200
    stopped = r.json()
    assert stopped["state"] == "stopped" and stopped["finished_at"] is not None
    assert stopped["counts"]["running"] == 0 and stopped["counts"]["failed"] == 2
    assert get_trial(http, second["trial_id"])["error"] == "study stopped"
    assert report(http, first["trial_id"], 1, 1.0) is True  # the worker is told to stop
    assert_error(http.post(f"{API}/studies/{sid}/ask"), 409, code="study_not_running")
    err = assert_error(
        http.patch(f"{API}/studies/{sid}", json={"state": "running"}), 409, field="state"
    )
    assert "stopped" in err["message"]
    assert get_study(http, sid)["state"] == "stopped"


def check_patch_budget(http: httpx.Client) -> None:
    sid = create(http, "budget", budget={"max_trials": 1})["id"]
    t0 = ask(http, sid)
    err = assert_error(
        http.post(f"{API}/studies/{sid}/ask"),
        409,
        code="budget_spent",
        field="budget.max_trials",
    )
    assert "max_trials" in err["message"]

    r = http.patch(f"{API}/studies/{sid}", json={"budget": {"max_trials": 3}})
    assert r.status_code == 200, r.text
    assert r.json()["spec"]["budget"]["max_trials"] == 3
    t1 = ask(http, sid)
    assert t1["number"] == 1

    r = http.patch(f"{API}/studies/{sid}", json={"budget": {"max_concurrent": 2}})
    assert r.status_code == 200 and r.json()["spec"]["budget"]["max_concurrent"] == 2
    err = assert_error(http.post(f"{API}/studies/{sid}/ask"), 409, code="concurrency_limit")
    assert "max_concurrent = 2" in err["message"]
    assert tell(http, t0["trial_id"], value=1.0).status_code == 200
    assert ask(http, sid)["number"] == 2

    # below what was handed out, zero, a wrong type, an unknown field, one a PATCH does not
    # change: refused, budget unchanged
    for budget in (
        {"max_trials": 2},
        {"max_trials": 0},
        {"max_concurrent": "many"},
        {"timeout": 3},
        {"timeout_s": -1},
        {"trial_timeout_s": 5},
    ):
        answer = http.patch(f"{API}/studies/{sid}", json={"budget": budget})
        assert_error(answer, 422, field="budget." + next(iter(budget)))
    assert get_study(http, sid)["spec"]["budget"] == {
        "max_trials": 3,
        "max_concurrent": 2,
        "timeout_s": None,
        "trial_timeout_s": None,
        "max_steps": None,
        "max_worker_seconds": None,
    }
    # the other budget fields change too
    r = http.patch(
        f"{API}/studies/{sid}",
        json={"budget": {"timeout_s": 3600, "max_steps": 500, "max_worker_seconds": 60.5}},
    )
    assert r.status_code == 200, r.text
    budget = r.json()["spec"]["budget"]
    assert (budget["timeout_s"], budget["max_steps"], budget["max_worker_seconds"]) == (
        3600,
        500,
        60.5,
    )

    # a study completed by its time: more trials alone are a 409 naming timeout_s (nothing
    # changed); a raised timeout_s runs it again
    sid = create(http, "timed", budget={"max_trials": 5, "timeout_s": 0.5})["id"]
    assert tell(http, ask(http, sid)["trial_id"], value=1.0).status_code == 200
    time.sleep(0.7)
    # (the ask completes it, or the server's sweep did already)
    assert http.post(f"{API}/studies/{sid}/ask").status_code == 409
    assert get_study(http, sid)["state"] == "completed"
    err = assert_error(
        http.patch(f"{API}/studies/{sid}", json={"budget": {"max_trials": 9}}),
        409,
        field="budget.timeout_s",
    )
    assert "raise budget.timeout_s" in err["message"]
    assert get_study(http, sid)["spec"]["budget"]["max_trials"] == 5
    r = http.patch(f"{API}/studies/{sid}", json={"budget": {"timeout_s": 3600}})
    assert r.status_code == 200 and r.json()["state"] == "running", r.text
    assert ask(http, sid)["number"] == 1


def check_delete_study(http: httpx.Client) -> None:
    keep = create(http, "keep")["id"]
    others = {s["id"] for s in all_studies(http)}
    sid = create(http, "gone")["id"]
    t = ask(http, sid)
    report(http, t["trial_id"], 0, 1.0)

    r = http.delete(f"{API}/studies/{sid}")
    assert r.status_code == 204 and r.content == b""
    assert_error(http.get(f"{API}/studies/{sid}"), 404, code="not_found", field="study_id")
    assert_error(http.get(f"{API}/trials/{t['trial_id']}"), 404, field="trial_id")
    assert_error(http.get(f"{API}/trials/{t['trial_id']}/metrics"), 404, field="trial_id")
    assert_error(http.post(f"{API}/studies/{sid}/ask"), 404)
    assert_error(http.delete(f"{API}/studies/{sid}"), 404)
    assert {s["id"] for s in all_studies(http)} == others
    assert keep in others and sid not in others
    # the name is free again
    assert create(http, "gone")["name"] == "gone"


def test_study_control(server: ServerProcess, subtests: pytest.Subtests) -> None:
    """PATCH (state, budget) and DELETE."""
    with server.http() as http:
        with subtests.test("pause, resume, stop"):
            check_patch_pause_resume_stop(http)
        with subtests.test("budget"):
            check_patch_budget(http)
        with subtests.test("delete"):
            check_delete_study(http)


# ------------------------------------------------------------------ trials


def check_ask_tell_get_trial_and_best(http: httpx.Client) -> None:
    sid = create(http, "asktell")["id"]
    a = ask(http, sid)
    assert set(a) >= {"trial_id", "number", "params"}
    assert a["number"] == 0 and a["attempt"] == 1
    assert set(a["params"]) == {"x", "n"}
    assert -5.0 <= a["params"]["x"] <= 5.0 and a["params"]["n"] in (1, 2, 3, 4)

    running = get_trial(http, a["trial_id"])
    assert running["state"] == "running" and running["value"] is None
    assert running["params"] == a["params"]
    assert running["lease_expires_at"] is not None and running["finished_at"] is None

    r = tell(http, a["trial_id"], value=0.25)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["state"] == "complete" and done["value"] == 0.25

    study_etag = http.get(f"{API}/studies/{sid}").headers["etag"]
    again = tell(http, a["trial_id"], value=0.25)
    assert again.status_code == 200 and again.json()["seq"] == done["seq"]
    assert (
        http.get(f"{API}/studies/{sid}", headers={"If-None-Match": study_etag}).status_code == 304
    )

    err = assert_error(tell(http, a["trial_id"], value=0.5), 409, code="trial_finished")
    assert "already finished as complete with value 0.25" in err["message"]
    assert_error(tell(http, a["trial_id"], state="failed"), 409, code="trial_finished")

    trial = get_trial(http, a["trial_id"])
    assert trial["state"] == "complete" and trial["value"] == 0.25
    assert trial["attempts"] == 1 and trial["number"] == 0 and trial["study_id"] == sid
    assert trial["params"] == a["params"]
    assert trial["started_at"] <= trial["finished_at"]
    assert trial["duration_s"] is not None and trial["duration_s"] >= 0
    assert [e["state"] for e in trial["events"]] == ["running", "complete"]
    assert trial["suggestion"]["sampler"] == "random"

    b = ask(http, sid)
    r = tell(http, b["trial_id"], state="failed", error="CUDA out of memory")
    assert r.status_code == 200 and r.json()["state"] == "failed"
    assert r.json()["error"] == "CUDA out of memory"
    assert tell(http, b["trial_id"], state="failed").status_code == 200
    assert_error(tell(http, b["trial_id"], value=0.1), 409, code="trial_finished")

    c = ask(http, sid)
    r = tell(http, c["trial_id"], state="pruned")
    assert r.status_code == 200 and r.json()["state"] == "pruned"
    assert tell(http, c["trial_id"], state="pruned").status_code == 200

    d = ask(http, sid)
    assert tell(http, d["trial_id"], value=-3.5).status_code == 200

    study = get_study(http, sid)
    assert study["counts"] == {
        "waiting": 0,
        "running": 0,
        "paused": 0,
        "complete": 2,
        "pruned": 1,
        "failed": 1,
    }
    assert study["n_trials"] == 4
    assert study["best_trial"]["id"] == d["trial_id"] and study["best_trial"]["value"] == -3.5
    best = http.get(f"{API}/studies/{sid}/best").json()
    assert best["best_trial"]["id"] == d["trial_id"]
    assert [t["id"] for t in best["best_trials"]] == [d["trial_id"]]


def check_best_when_maximizing_and_multi_objective_tell(http: httpx.Client) -> None:
    sid = create(http, "max", objective={"metric": "acc", "direction": "maximize"})["id"]
    empty = http.get(f"{API}/studies/{sid}/best").json()
    assert empty == {"best_trial": None, "best_trials": []}
    by_value = {}
    for v in (0.7, 0.9, 0.8):
        t = ask(http, sid)
        tell(http, t["trial_id"], value=v)
        by_value[v] = t["trial_id"]
    assert http.get(f"{API}/studies/{sid}/best").json()["best_trial"]["id"] == by_value[0.9]
    assert get_study(http, sid)["best_trial"]["value"] == 0.9

    sid = create(
        http, "mo", objective=[{"metric": "err"}, {"metric": "speed", "direction": "maximize"}]
    )["id"]
    assert get_study(http, sid)["directions"] == ["minimize", "maximize"]
    ids = []
    for vals in [(0.1, 1.0), (0.2, 5.0), (0.3, 4.0)]:
        t = ask(http, sid)
        r = tell(http, t["trial_id"], values=list(vals))
        assert r.status_code == 200, r.text
        assert r.json()["values"] == list(vals) and r.json()["value"] is None
        ids.append(t["trial_id"])
    assert tell(http, ids[0], values=[0.1, 1.0]).status_code == 200
    assert_error(tell(http, ids[0], values=[0.1, 2.0]), 409, code="trial_finished")

    t = ask(http, sid)
    for body, field in [
        ({"values": [0.5]}, "values"),
        ({"values": [0.5, 1.0, 2.0]}, "values"),
        ({"value": 0.5}, "value"),
    ]:
        err = assert_error(tell(http, t["trial_id"], **body), 422, field=field)
        assert "2 objective(s)" in err["message"]
    assert get_trial(http, t["trial_id"])["state"] == "running"

    best = http.get(f"{API}/studies/{sid}/best").json()
    assert best["best_trial"] is None
    assert [b["id"] for b in best["best_trials"]] == ids[:2]


def check_grid_exhaustion_is_409_and_completes_the_study(http: httpx.Client) -> None:
    sid = create(
        http,
        "grid",
        sampler={"type": "grid"},
        space={"c": {"type": "categorical", "choices": ["a", "b"]}},
    )["id"]
    first, second = ask(http, sid), ask(http, sid)
    assert [first["params"], second["params"]] == [{"c": "a"}, {"c": "b"}]
    err = assert_error(http.post(f"{API}/studies/{sid}/ask"), 409, code="grid_exhausted")
    assert "exhausted" in err["message"] and "2 points" in err["message"]
    assert get_study(http, sid)["state"] == "running"  # two trials are still running
    tell(http, first["trial_id"], value=1.0)
    tell(http, second["trial_id"], value=2.0)
    study = get_study(http, sid)
    assert study["state"] == "completed"
    assert study["state_reason"] == "search space exhausted"
    assert study["n_trials"] == 2
    assert_error(http.post(f"{API}/studies/{sid}/ask"), 409, code="grid_exhausted")


def check_spent_budget_is_409_and_completes_the_study(http: httpx.Client) -> None:
    sid = create(http, "spent", budget={"max_trials": 2})["id"]
    for _ in range(2):
        tell(http, ask(http, sid)["trial_id"], value=1.0)
    err = assert_error(http.post(f"{API}/studies/{sid}/ask"), 409, code="budget_spent")
    assert "all 2 trials" in err["message"]
    study = get_study(http, sid)
    assert study["state"] == "completed" and study["state_reason"] == "budget spent"
    assert study["n_trials"] == 2 and study["counts"]["complete"] == 2


def check_export_csv(http: httpx.Client) -> None:
    sid = create(http, "exported")["id"]
    asked = [ask(http, sid) for _ in range(3)]
    tell(http, asked[0]["trial_id"], value=1.5)
    tell(http, asked[1]["trial_id"], state="failed", error="boom")
    r = http.get(f"{API}/studies/{sid}/export.csv")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert 'filename="exported.csv"' in r.headers["content-disposition"]
    reader = csv.DictReader(io.StringIO(r.text))
    header = reader.fieldnames
    assert header[:4] == ["number", "trial_id", "state", "value"]
    assert {"params_x", "params_n", "attempts", "duration_s", "error"} <= set(header)
    assert header.index("params_x") > header.index("value")
    rows = list(reader)
    assert [row["number"] for row in rows] == ["0", "1", "2"]
    assert [row["state"] for row in rows] == ["complete", "failed", "running"]
    assert float(rows[0]["value"]) == 1.5 and rows[1]["value"] == "" and rows[2]["value"] == ""
    assert rows[1]["error"] == "boom"
    for row, a in zip(rows, asked, strict=True):
        assert int(row["trial_id"]) == a["trial_id"]
        assert float(row["params_x"]) == a["params"]["x"]
        assert int(row["params_n"]) == a["params"]["n"]


def test_ask_tell_and_results(server: ServerProcess, subtests: pytest.Subtests) -> None:
    """ask, tell (single and multi-objective), trial details, best, grid and budget ends, CSV."""
    with server.http() as http:
        with subtests.test("ask, tell, trial, best"):
            check_ask_tell_get_trial_and_best(http)
        with subtests.test("maximize and multi-objective"):
            check_best_when_maximizing_and_multi_objective_tell(http)
        with subtests.test("grid exhausted"):
            check_grid_exhaustion_is_409_and_completes_the_study(http)
        with subtests.test("budget spent"):
            check_spent_budget_is_409_and_completes_the_study(http)
        with subtests.test("export.csv"):
            check_export_csv(http)


def check_metrics_stream_and_asha_should_stop(http: httpx.Client) -> None:
    sid = create(http, "asha", pruner={"type": "asha", "min_steps": 1, "reduction_factor": 2})["id"]
    good = ask(http, sid)["trial_id"]
    r = http.post(
        f"{API}/trials/{good}/metrics",
        json={
            "points": [
                {"step": 0, "name": "loss", "value": 0.5},
                {"step": 0, "name": "acc", "value": 0.6},
                {"step": 1, "name": "loss", "value": 0.1},
                {"step": 1, "name": "acc", "value": 0.8},
            ]
        },
    )
    assert r.status_code == 200 and r.json() == {"should_stop": False}
    assert report(http, good, 2, 0.05) is False

    bad = ask(http, sid)["trial_id"]
    assert report(http, bad, 0, 0.95) is False
    tag = http.get(f"{API}/studies/{sid}").headers["etag"]
    assert report(http, bad, 1, 0.9) is True  # far worse than the good trial at rung 1
    # Pruned inside a metric report: a change of state, which moves the study's ETag.
    assert http.get(f"{API}/studies/{sid}", headers={"If-None-Match": tag}).status_code == 200
    pruned = get_trial(http, bad)
    assert pruned["state"] == "pruned" and pruned["value"] == 0.9
    assert pruned["pruned"]["pruner"] == "asha" and pruned["pruned"]["threshold"] == 0.1
    assert "asha" in pruned["events"][-1]["detail"]
    assert report(http, bad, 2, 0.8) is True  # keeps saying stop
    assert tell(http, bad, state="pruned").status_code == 200  # the same outcome
    assert get_trial(http, good)["state"] == "running"
    assert get_trial(http, good)["last_step"] == 2

    pts = http.get(f"{API}/trials/{good}/metrics").json()["points"]
    assert [(p["step"], p["name"], p["value"]) for p in pts] == [
        (0, "loss", 0.5),
        (0, "acc", 0.6),
        (1, "loss", 0.1),
        (1, "acc", 0.8),
        (2, "loss", 0.05),
    ]
    loss = http.get(f"{API}/trials/{good}/metrics", params={"name": "loss"}).json()["points"]
    assert [p["value"] for p in loss] == [0.5, 0.1, 0.05]
    later = http.get(
        f"{API}/trials/{good}/metrics", params={"name": "loss", "since_step": 0}
    ).json()["points"]
    assert [(p["step"], p["value"]) for p in later] == [(1, 0.1), (2, 0.05)]
    none = http.get(f"{API}/trials/{good}/metrics", params={"since_step": 2}).json()
    assert none == {"points": []}

    assert tell(http, good, value=0.05).status_code == 200
    err = assert_error(
        http.post(
            f"{API}/trials/{good}/metrics",
            json={"points": [{"step": 3, "name": "loss", "value": 0.01}]},
        ),
        409,
        code="trial_finished",
    )
    assert "complete" in err["message"]
    assert len(http.get(f"{API}/trials/{good}/metrics").json()["points"]) == 5


def check_trials_since_cursor_state_filter_and_etag(http: httpx.Client) -> None:
    sid = create(http, "since")["id"]
    a, b, c = (ask(http, sid)["trial_id"] for _ in range(3))
    r = http.get(f"{API}/studies/{sid}/trials")
    assert r.status_code == 200
    page = r.json()
    assert sorted(t["id"] for t in page["trials"]) == sorted([a, b, c])
    cursor = page["cursor"]
    etag = r.headers["etag"]

    assert http.get(f"{API}/studies/{sid}/trials", params={"since": cursor}).json()["trials"] == []
    cached = http.get(f"{API}/studies/{sid}/trials", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""

    tell(http, b, value=2.0)
    report(http, c, 3, 0.5)
    changed = http.get(f"{API}/studies/{sid}/trials", params={"since": cursor}).json()
    assert sorted(t["id"] for t in changed["trials"]) == sorted([b, c])
    states = {t["id"]: (t["state"], t["value"], t["last_step"]) for t in changed["trials"]}
    assert states == {b: ("complete", 2.0, None), c: ("running", None, 3)}
    assert changed["cursor"] > cursor
    assert (
        http.get(f"{API}/studies/{sid}/trials", params={"since": changed["cursor"]}).json()[
            "trials"
        ]
        == []
    )
    assert (
        http.get(f"{API}/studies/{sid}/trials", headers={"If-None-Match": etag}).status_code == 200
    )

    running = http.get(f"{API}/studies/{sid}/trials", params={"state": "running"}).json()
    assert sorted(t["id"] for t in running["trials"]) == sorted([a, c])
    both = http.get(f"{API}/studies/{sid}/trials", params={"state": "complete,running"}).json()
    assert len(both["trials"]) == 3
    err = assert_error(
        http.get(f"{API}/studies/{sid}/trials", params={"state": "bogus"}), 422, field="state"
    )
    assert "bogus" in err["message"]
    assert_error(
        http.get(f"{API}/studies/{sid}/trials", params={"since": -1}), 422, field="query.since"
    )


def check_metric_points_keep_the_study_etag_and_move_the_curves(http: httpx.Client) -> None:
    sid = create(http, "curves-cursor")["id"]
    a, b = (ask(http, sid)["trial_id"] for _ in range(2))
    report(http, a, 0, 0.9)
    first = http.get(f"{API}/studies/{sid}")
    study_tag, seq = first.headers["etag"], first.json()["seq"]
    trials_tag = http.get(f"{API}/studies/{sid}/trials").headers["etag"]
    curves = http.get(f"{API}/studies/{sid}/curves", params={"metric": "loss"})
    curves_tag, cursor = curves.headers["etag"], curves.json()["cursor"]
    assert [c["trial_id"] for c in curves.json()["series"]] == [a]
    step_cursor = http.get(f"{API}/trials/{a}/metrics").json()["points"][-1]["step"]

    for step in range(1, 4):  # both trials stream
        report(http, a, step, 0.9 - step / 10)
        report(http, b, step, 0.8 - step / 10)
        cached = http.get(f"{API}/studies/{sid}", headers={"If-None-Match": study_tag})
        assert cached.status_code == 304, "a metric point moved the study's ETag"
    assert get_study(http, sid)["seq"] == seq
    # The trial list carries last_step: its ETag moves with points, so it is never stale.
    assert (
        http.get(f"{API}/studies/{sid}/trials", headers={"If-None-Match": trials_tag}).status_code
        == 200
    )
    assert {t["id"]: t["last_step"] for t in get_trials(http, sid)} == {a: 3, b: 3}

    # The curves have their own cursor: it returns the trials whose points are new...
    grown = http.get(
        f"{API}/studies/{sid}/curves",
        params={"metric": "loss", "since": cursor},
        headers={"If-None-Match": curves_tag},
    )
    assert grown.status_code == 200 and grown.json()["cursor"] > cursor
    series = {c["trial_id"]: (c["steps"], c["last_step"]) for c in grown.json()["series"]}
    assert series == {a: ([0, 1, 2, 3], 3), b: ([1, 2, 3], 3)}
    cursor, curves_tag = grown.json()["cursor"], grown.headers["etag"]
    report(http, b, 4, 0.3)
    only_b = http.get(
        f"{API}/studies/{sid}/curves", params={"metric": "loss", "since": cursor}
    ).json()
    assert [c["trial_id"] for c in only_b["series"]] == [b]
    quiet = http.get(
        f"{API}/studies/{sid}/curves",
        params={"metric": "loss", "since": only_b["cursor"]},
    )
    assert quiet.json()["series"] == []
    again = http.get(
        f"{API}/studies/{sid}/curves",
        params={"metric": "loss", "since": only_b["cursor"]},
        headers={"If-None-Match": quiet.headers["etag"]},
    )
    assert again.status_code == 304
    # ...and a trial's points after a step cursor are only the new ones.
    new = http.get(f"{API}/trials/{a}/metrics", params={"since_step": step_cursor}).json()
    assert [p["step"] for p in new["points"]] == [1, 2, 3]

    # A change of state moves the study's ETag and seq (and the trial's seq).
    assert http.get(f"{API}/studies/{sid}", headers={"If-None-Match": study_tag}).status_code == 304
    assert tell(http, a, value=0.5).status_code == 200
    moved = http.get(f"{API}/studies/{sid}", headers={"If-None-Match": study_tag})
    assert moved.status_code == 200 and moved.json()["seq"] > seq
    assert moved.json()["counts"]["complete"] == 1
    assert get_trial(http, a)["seq"] > seq
    assert get_trial(http, b)["seq"] < get_trial(http, b)["curve_seq"]
    # A trial told pruned is a change of state too.
    assert http.post(f"{API}/trials/{b}/tell", json={"state": "pruned"}).status_code == 200
    assert (
        http.get(f"{API}/studies/{sid}", headers={"If-None-Match": moved.headers["etag"]})
    ).status_code == 200


def get_trials(http: httpx.Client, sid: int) -> list[dict]:
    r = http.get(f"{API}/studies/{sid}/trials")
    assert r.status_code == 200, r.text
    return r.json()["trials"]


def test_metrics_and_change_feed(server: ServerProcess, subtests: pytest.Subtests) -> None:
    """Metric streams with an ASHA pruner, and the trial list's `since` cursor and ETag."""
    with server.http() as http:
        with subtests.test("metrics and ASHA"):
            check_metrics_stream_and_asha_should_stop(http)
        with subtests.test("since cursor"):
            check_trials_since_cursor_state_filter_and_etag(http)
        with subtests.test("study ETag holds while curves grow"):
            check_metric_points_keep_the_study_etag_and_move_the_curves(http)
        with subtests.test("a study's points, a page of trials at a time"):
            check_study_points_a_page_of_trials_at_a_time(http)


def check_study_points_a_page_of_trials_at_a_time(http: httpx.Client) -> None:
    sid = create(http, "study-points")["id"]
    tids = [ask(http, sid)["trial_id"] for _ in range(5)]
    for i, tid in enumerate(tids):  # trial i reports steps 0 .. i - 1 of two metrics
        for step in range(i):
            report(http, tid, step, float(10 * i + step))
            report(http, tid, step, 0.5, name="acc")
    url = f"{API}/studies/{sid}/metrics"
    pages, after = [], None
    while True:
        params: dict[str, Any] = {"name": "loss", "limit": 2}
        if after is not None:
            params["after"] = after
        r = http.get(url, params=params)
        assert r.status_code == 200, r.text
        pages.append(r.json()["points"])
        after = r.json()["cursor"]
        if after is None:
            break
    assert len(pages) == 3, pages  # 5 trials, 2 a page
    got = [(p["trial_id"], p["number"], p["step"], p["name"], p["value"]) for g in pages for p in g]
    assert got == [
        (tid, i, step, "loss", float(10 * i + step))
        for i, tid in enumerate(tids)
        for step in range(i)
    ]
    every = http.get(url, params={"limit": 1000}).json()
    assert every["cursor"] is None and len(every["points"]) == 2 * sum(range(5))
    for tid in tids:  # each trial's points as its own route gives them, in that order
        own = http.get(f"{API}/trials/{tid}/metrics").json()["points"]
        mine = [p for p in every["points"] if p["trial_id"] == tid]
        assert [{k: p[k] for k in own[0]} for p in mine] == own if own else not mine
    assert http.get(url, params={"name": "nope"}).json() == {"points": [], "cursor": None}
    assert_error(http.get(f"{API}/studies/999999/metrics"), 404, field="study_id")
    assert_error(http.get(url, params={"limit": 0}), 422, field="query.limit")
    assert_error(http.get(url, params={"after": -1}), 422, field="query.after")


def test_lease_expiry_over_http(server: ServerProcess) -> None:
    """The served app sweeps leases every 0.5 s in tests: a silent trial fails on its own,
    a trial with retries left goes back to waiting, and heartbeats keep a trial alive."""
    with server.http() as http:
        sid = create(http, "lease", lease_s=1, budget={"max_concurrent": 1})["id"]
        retry_sid = create(http, "retry", lease_s=1, max_retries=1)["id"]
        alive_sid = create(http, "alive", lease_s=1)["id"]
        t = ask(http, sid)
        retried = ask(http, retry_sid)
        alive = ask(http, alive_sid)
        assert_error(http.post(f"{API}/studies/{sid}/ask"), 409, code="concurrency_limit")
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            r = http.post(f"{API}/trials/{alive['trial_id']}/heartbeat")
            assert r.status_code == 200 and r.json() == {"should_stop": False}
            time.sleep(0.25)

        # reads only: nothing but the sweeper can have expired these leases
        trial = get_trial(http, t["trial_id"])
        assert trial["state"] == "failed", trial
        assert trial["error"] == "lease expired"
        assert trial["lease_expires_at"] is None
        assert [e["state"] for e in trial["events"]] == ["running", "failed"]
        assert trial["events"][-1]["detail"] == "lease expired"
        assert get_study(http, sid)["counts"]["running"] == 0
        assert get_trial(http, alive["trial_id"])["state"] == "running"

        waiting = get_trial(http, retried["trial_id"])
        assert waiting["state"] == "waiting" and waiting["attempts"] == 2
        assert waiting["error"] == "lease expired"
        err = assert_error(tell(http, retried["trial_id"], value=1.0), 409)
        assert "waiting" in err["message"]

        assert ask(http, sid)["number"] == 1  # the slot is free again
        again = ask(http, retry_sid)  # the retry: same trial, same params, next attempt
        assert (again["trial_id"], again["number"], again["attempt"]) == (retried["trial_id"], 0, 2)
        assert again["params"] == retried["params"]

        # the late worker's result is refused, its metrics too
        assert_error(tell(http, t["trial_id"], value=1.0), 409, code="trial_finished")
        assert_error(
            http.post(
                f"{API}/trials/{t['trial_id']}/metrics",
                json={"points": [{"step": 0, "name": "loss", "value": 1.0}]},
            ),
            409,
            code="trial_finished",
        )
        assert_error(http.post(f"{API}/trials/{t['trial_id']}/heartbeat"), 409)


# --------------------------------------------------------------- bad input

INVALID_SPECS: list[tuple[str, Any, str, str]] = [
    # (case, body: dict or raw JSON text, field, a word the message must contain)
    ("malformed JSON", '{"name": "x", "space": ', "body", "JSON"),
    ("not an object", "[1, 2]", "body", "dictionary"),
    ("missing name", {k: v for k, v in simple_spec().items() if k != "name"}, "name", "required"),
    (
        "missing space",
        {k: v for k, v in simple_spec().items() if k != "space"},
        "space",
        "required",
    ),
    ("empty space", simple_spec(space={}), "space", "at least one parameter"),
    ("bad name", simple_spec("has space"), "name", "pattern"),
    ("unknown sampler", simple_spec(sampler={"type": "bogo"}), "sampler.type", "bogo"),
    ("unknown pruner", simple_spec(pruner={"type": "nope"}), "pruner.type", "nope"),
    (
        "low > high",
        simple_spec(space={"lr": {"type": "float", "low": 1.0, "high": 0.1}}),
        "space.lr",
        "greater",
    ),
    (
        "empty choices",
        simple_spec(space={"opt": {"type": "categorical", "choices": []}}),
        "space.opt.choices",
        "empty",
    ),
    (
        "string for low",
        simple_spec(space={"lr": {"type": "float", "low": "0.1", "high": 1.0}}),
        "space.lr.low",
        "number",
    ),
    (
        "float for int",
        simple_spec(space={"n": {"type": "int", "low": 1.5, "high": 4}}),
        "space.n.low",
        "integer",
    ),
    (
        "unknown param type",
        simple_spec(space={"n": {"type": "complex", "low": 1, "high": 4}}),
        "space.n",
        "type",
    ),
    (
        "log with low <= 0",
        simple_spec(space={"lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}),
        "space.lr",
        "log",
    ),
    ("unknown top-level key", {**simple_spec(), "sampelr": {"type": "tpe"}}, "sampelr", "unknown"),
    (
        "unknown param key",
        simple_spec(space={"lr": {"type": "float", "low": 0.1, "high": 1.0, "scale": "log"}}),
        "space.lr.scale",
        "unknown",
    ),
    ("zero max_trials", simple_spec(budget={"max_trials": 0}), "budget.max_trials", "greater"),
    (
        "no objective",
        {k: v for k, v in simple_spec().items() if k != "objective"},
        "objective",
        "required",
    ),
    (
        "objective direction",
        simple_spec(objective={"metric": "loss", "direction": "down"}),
        "objective[0].direction",
        "minimize",
    ),
]


def check_invalid_specs_are_refused_and_nothing_is_stored(
    http: httpx.Client, subtests: pytest.Subtests
) -> None:
    create(http, "taken")
    before = all_studies(http)
    for case, body, field, word in INVALID_SPECS:
        with subtests.test(case):
            if isinstance(body, str):
                r = http.post(f"{API}/studies", content=body, headers=JSON)
            else:
                r = http.post(f"{API}/studies", json=body)
            err = assert_error(r, 422, code="invalid_input", field=field)
            assert word in err["message"], err

    with subtests.test("grid over a continuous float"):
        r = http.post(
            f"{API}/studies",
            json=simple_spec(
                "grid",
                sampler={"type": "grid"},
                space={"lr": {"type": "float", "low": 0.001, "high": 0.1}},
            ),
        )
        err = assert_error(r, 422, code="invalid_input")
        assert "space.lr" in err["message"]
        assert "`step` or explicit `values`" in err["message"]

    with subtests.test("duplicate name"):
        r = http.post(f"{API}/studies", json=simple_spec("taken", sampler={"type": "tpe"}))
        err = assert_error(r, 409, code="name_taken", field="name")
        assert "'taken'" in err["message"]

    assert all_studies(http) == before


def check_unknown_and_malformed_ids(http: httpx.Client, subtests: pytest.Subtests) -> None:
    sid = create(http, "ids")["id"]
    tid = ask(http, sid)["trial_id"]
    before_study, before_trial = get_study(http, sid), get_trial(http, tid)
    missing_s, missing_t = sid + 1000, tid + 1000
    points = {"points": [{"step": 0, "name": "loss", "value": 1.0}]}
    cases = [
        ("GET", f"/studies/{missing_s}", None, "study_id"),
        ("PATCH", f"/studies/{missing_s}", {"state": "paused"}, "study_id"),
        ("DELETE", f"/studies/{missing_s}", None, "study_id"),
        ("POST", f"/studies/{missing_s}/ask", None, "study_id"),
        ("GET", f"/studies/{missing_s}/trials", None, "study_id"),
        ("GET", f"/studies/{missing_s}/best", None, "study_id"),
        ("GET", f"/studies/{missing_s}/export.csv", None, "study_id"),
        ("GET", f"/trials/{missing_t}", None, "trial_id"),
        ("POST", f"/trials/{missing_t}/tell", {"value": 1.0}, "trial_id"),
        ("POST", f"/trials/{missing_t}/metrics", points, "trial_id"),
        ("GET", f"/trials/{missing_t}/metrics", None, "trial_id"),
    ]
    for method, path, body, field in cases:
        with subtests.test(f"{method} {path}"):
            r = http.request(method, API + path, json=body)
            err = assert_error(r, 404, code="not_found", field=field)
            assert str(missing_s if field == "study_id" else missing_t) in err["message"]
    for method, path, body in [
        ("GET", "/studies/abc", None),
        ("PATCH", "/studies/1.5", {"state": "paused"}),
        ("DELETE", "/studies/abc", None),
        ("POST", "/studies/abc/ask", None),
        ("GET", "/trials/abc", None),
        ("POST", "/trials/x1/tell", {"value": 1.0}),
        ("POST", "/trials/abc/metrics", points),
    ]:
        with subtests.test(f"{method} {path}"):
            err = assert_error(http.request(method, API + path, json=body), 422)
            assert err["field"].endswith("_id"), err
    after_study = get_study(http, sid)
    assert after_study["state"] == "running" and after_study["seq"] == before_study["seq"]
    after_trial = get_trial(http, tid)
    after_trial.pop("duration_s"), before_trial.pop("duration_s")  # a running trial's age
    assert after_trial == before_trial


def check_bad_tells_and_metrics_leave_the_trial_untouched(
    http: httpx.Client, subtests: pytest.Subtests
) -> None:
    sid = create(http, "badtell")["id"]
    tid = ask(http, sid)["trial_id"]
    report(http, tid, 0, 0.5)
    before = get_trial(http, tid)
    tell_cases = [
        ("NaN", '{"value": NaN}', "value", "finite"),
        ("Infinity", '{"value": Infinity}', "value", "finite"),
        ("-Infinity", '{"value": -Infinity}', "value", "finite"),
        ("huge literal", '{"value": 1e400}', "value", "finite"),
        ("NaN in values", '{"values": [NaN]}', "values", "finite"),
        ("string value", '{"value": "0.5"}', "value", "number"),
        ("bool value", '{"value": true}', "value", "number"),
        ("no value", "{}", "value", "needs"),
        ("value and values", '{"value": 1, "values": [1]}', "value", "either"),
        ("failed with value", '{"state": "failed", "value": 1}', "value", "no value"),
        ("unknown state", '{"state": "exploded"}', "state", "complete"),
        ("unknown key", '{"value": 1, "vaule": 2}', "vaule", "unknown"),
        ("malformed JSON", '{"value": ', "body", "JSON"),
        ("wrong length", '{"values": [1.0, 2.0]}', "values", "1 objective(s)"),
    ]
    for case, text, field, word in tell_cases:
        with subtests.test(f"tell: {case}"):
            r = http.post(f"{API}/trials/{tid}/tell", content=text, headers=JSON)
            err = assert_error(r, 422, code="invalid_input", field=field)
            assert word in err["message"], err

    metric_cases = [
        ("NaN", '{"points": [{"step": 1, "name": "loss", "value": NaN}]}', "points[0].value"),
        (
            "Infinity",
            '{"points": [{"step": 1, "name": "loss", "value": 2}, '
            '{"step": 2, "name": "loss", "value": Infinity}]}',
            "points[1].value",
        ),
        ("-Infinity", '{"points": [{"step": 1, "name": "loss", "value": -Infinity}]}', None),
        ("float step", '{"points": [{"step": 1.5, "name": "loss", "value": 1}]}', None),
        ("negative step", '{"points": [{"step": -1, "name": "loss", "value": 1}]}', None),
        ("empty name", '{"points": [{"step": 1, "name": "", "value": 1}]}', None),
        ("string value", '{"points": [{"step": 1, "name": "loss", "value": "1"}]}', None),
        ("missing points", "{}", "points"),
        ("malformed JSON", '{"points": [', "body"),
    ]
    for case, text, field in metric_cases:
        with subtests.test(f"metrics: {case}"):
            r = http.post(f"{API}/trials/{tid}/metrics", content=text, headers=JSON)
            err = assert_error(r, 422, code="invalid_input", field=field)
            assert err["field"].startswith(("points", "body")), err

    with subtests.test("trial untouched"):
        after = get_trial(http, tid)
        assert after["state"] == "running" and after["value"] is None
        assert after["seq"] == before["seq"] and after["last_step"] == 0
        points = http.get(f"{API}/trials/{tid}/metrics").json()["points"]
        assert [(p["step"], p["value"]) for p in points] == [(0, 0.5)]

    with subtests.test("tell twice with different values"):
        assert tell(http, tid, value=0.5).status_code == 200
        err = assert_error(tell(http, tid, value=0.6), 409, code="trial_finished")
        assert "0.5" in err["message"]
        assert get_trial(http, tid)["value"] == 0.5

    with subtests.test("PATCH with an unknown state"):
        err = assert_error(
            http.patch(f"{API}/studies/{sid}", json={"state": "exploded"}), 422, field="state"
        )
        assert "paused" in err["message"]
        assert_error(http.patch(f"{API}/studies/{sid}", json={"sate": "paused"}), 422)
        assert_error(http.patch(f"{API}/studies/{sid}", content='{"state": ', headers=JSON), 422)
        assert get_study(http, sid)["state"] == "running"


def test_bad_input_is_4xx_json_and_changes_nothing(
    server: ServerProcess, subtests: pytest.Subtests
) -> None:
    with server.http() as http:
        check_invalid_specs_are_refused_and_nothing_is_stored(http, subtests)
        check_unknown_and_malformed_ids(http, subtests)
        check_bad_tells_and_metrics_leave_the_trial_untouched(http, subtests)


# ------------------------------------------------------ bugs found by tests


def test_integers_beyond_64_bits_are_4xx_not_500(server: ServerProcess) -> None:
    big = 2**64
    with server.http() as http:
        sid = create(http)["id"]
        tid = ask(http, sid)["trial_id"]
        requests = [
            ("GET", f"/studies/{big}", None),
            ("POST", f"/studies/{big}/ask", None),
            ("GET", f"/trials/{big}", None),
            ("POST", f"/trials/{big}/tell", {"value": 1.0}),
            ("GET", f"/studies?cursor={big}", None),
            ("GET", f"/studies/{sid}/trials?since={big}", None),
            ("GET", f"/trials/{tid}/metrics?since_step={big}", None),
            (
                "POST",
                f"/trials/{tid}/metrics",
                {"points": [{"step": big, "name": "l", "value": 1}]},
            ),
        ]
        answers = {}
        for method, path, body in requests:
            with server.http() as fresh:  # a 500 closes the connection
                answers[f"{method} {path}"] = fresh.request(
                    method, API + path, json=body
                ).status_code
        assert {k: v for k, v in answers.items() if not 400 <= v < 500} == {}
        assert get_trial(http, tid)["state"] == "running"


def test_a_study_that_was_accepted_can_be_asked(sqlite_server: ServerProcess) -> None:
    server = sqlite_server  # the failures are in the samplers and lease code, not the database
    specs = {
        "int range beyond int64": simple_spec(
            "i", space={"n": {"type": "int", "low": 0, "high": 2**70}}
        ),
        "float range wider than a double": simple_spec(
            "f", space={"x": {"type": "float", "low": -1e308, "high": 1e308}}
        ),
        "lease_s beyond timedelta": simple_spec("l", lease_s=1e300),
    }
    answers = {}
    with server.http() as http:
        for case, spec in specs.items():
            created = http.post(f"{API}/studies", json=spec)
            if created.status_code == 422:  # refusing it up front is fine too
                answers[case] = 422
                continue
            assert created.status_code == 201, created.text
            with server.http() as fresh:
                answers[case] = fresh.post(f"{API}/studies/{created.json()['id']}/ask").status_code
    assert {k: v for k, v in answers.items() if v not in (201, 422)} == {}


def test_ids_of_deleted_studies_and_trials_are_never_reused(
    server: ServerProcess, request: pytest.FixtureRequest
) -> None:
    with server.http() as http:
        old = create(http, "old")
        etag = http.get(f"{API}/studies/{old['id']}").headers["etag"]
        old_trial = ask(http, old["id"])["trial_id"]
        assert http.delete(f"{API}/studies/{old['id']}").status_code == 204

        new = create(http, "new")
        new_trial = ask(http, new["id"])["trial_id"]
        stale = http.get(f"{API}/studies/{old['id']}", headers={"If-None-Match": etag})
        late_tell = tell(http, old_trial, value=1.0)

        assert new["id"] != old["id"]
        assert new_trial != old_trial
        assert stale.status_code == 404
        assert late_tell.status_code == 404
        assert get_trial(http, new_trial)["state"] == "running"


# ------------------------------------------------- bugs found by fuzzing the API


def _deep(levels: int) -> dict:
    value: dict = {"a": 1}
    for _ in range(levels):
        value = {"a": value}
    return value


def _spec_text(name: str, insert: str, **over: Any) -> str:
    """A spec as JSON text with ``insert`` (raw JSON members, e.g. ``NaN``) added to it."""
    text = json.dumps(simple_spec(name, **over))
    return text[:-1] + ", " + insert + "}"


FUZZED_SPECS: list[tuple[str, str | bytes, str, str]] = [
    # (case, raw body, field, a word the message must contain); each used to answer 500 or to
    # store a spec that later broke every read of the study
    (
        "gpus_per_worker Infinity",
        _spec_text("g", '"resources": {"gpus_per_worker": Infinity}'),
        "resources.gpus_per_worker",
        "finite",
    ),
    (
        "cpus_per_worker Infinity",
        _spec_text("c", '"resources": {"cpus_per_worker": Infinity}'),
        "resources.cpus_per_worker",
        "finite",
    ),
    ("user_attrs NaN", _spec_text("u", '"user_attrs": {"a": [1, NaN]}'), "user_attrs", "finite"),
    (
        "user_attrs 600 levels deep",
        _spec_text("d", '"user_attrs": ' + json.dumps(_deep(600))),
        "user_attrs",
        "nested",
    ),
    (
        "trainable config NaN",
        _spec_text("t", '"trainable": {"name": "synthetic", "config": {"x": NaN}}'),
        "trainable.config",
        "finite",
    ),
    (
        "a global batch that 3 ranks cannot share",
        json.dumps(
            simple_spec(
                "b",
                trainable={"name": "image-classification", "config": {"epochs": 1}},
                resources={"workers_per_trial": 3},
                space={"batch_size": {"type": "categorical", "choices": [48, 64]}},
            )
        ),
        "space.batch_size",
        "does not split evenly over 3 DDP ranks",
    ),
    (
        "float step too small (grid)",
        json.dumps(
            simple_spec(
                "sg",
                sampler={"type": "grid"},
                space={"x": {"type": "float", "low": 0.0, "high": 1.0, "step": 5e-324}},
            )
        ),
        "space.x",
        "too small",
    ),
    (
        "float step too small (random)",
        json.dumps(
            simple_spec(
                "sr", space={"x": {"type": "float", "low": 0.0, "high": 1.0, "step": 1e-300}}
            )
        ),
        "space.x",
        "too small",
    ),
    (
        "NUL in an objective metric",
        json.dumps(simple_spec("n", objective={"metric": "lo\x00ss"})),
        "objective[0].metric",
        "NUL",
    ),
    ("max_trials true", json.dumps(simple_spec("b", budget={"max_trials": True})), "budget", ""),
    ("body not UTF-8", b'{"name": "\xff\xfe"}', "body", "UTF-8"),
    ("body nested too deeply", "[" * 100_000 + "]" * 100_000, "body", "nested"),
]


def test_fuzzed_specs_are_422_and_store_nothing(
    server: ServerProcess, subtests: pytest.Subtests
) -> None:
    with server.http() as http:
        before = all_studies(http)
        for case, body, field, word in FUZZED_SPECS:
            with subtests.test(case), server.http() as fresh:  # a 500 closes the connection
                err = assert_error(
                    fresh.post(f"{API}/studies", content=body, headers=JSON),
                    422,
                    code="invalid_input",
                )
                assert err["field"].startswith(field), err
                assert word in err["message"], err
        assert all_studies(http) == before


def test_fuzzed_trial_requests_are_4xx_and_change_nothing(
    server: ServerProcess, subtests: pytest.Subtests
) -> None:
    """NUL characters (PostgreSQL text cannot hold them), control characters in the state
    filter (they went into the ETag header verbatim) and non-integer budgets."""
    with server.http() as http:
        sid = create(http, "fuzzed", budget={"max_trials": 10})["id"]
        tid = ask(http, sid)["trial_id"]
        report(http, tid, 0, 0.5)
        before_trial, before_study = get_trial(http, tid), get_study(http, sid)
        cases = [
            ("POST", f"/trials/{tid}/tell", {"state": "failed", "error": "a\x00b"}, "error"),
            (
                "POST",
                f"/trials/{tid}/metrics",
                {"points": [{"step": 1, "name": "lo\x00ss", "value": 1.0}]},
                "points[0].name",
            ),
            ("GET", f"/trials/{tid}/metrics?name=lo%00ss", None, "query.name"),
            ("GET", "/studies?name=fuzzed%00", None, "query.name"),
            ("PATCH", f"/studies/{sid}", {"budget": {"max_trials": True}}, "budget.max_trials"),
            ("PATCH", f"/studies/{sid}", {"budget": {"max_trials": "5"}}, "budget.max_trials"),
            ("PATCH", f"/studies/{sid}", {"budget": {"max_concurrent": 2.0}}, "budget."),
        ]
        for method, path, body, field in cases:
            with subtests.test(f"{method} {path} {body}"), server.http() as fresh:
                err = assert_error(fresh.request(method, API + path, json=body), 422)
                assert err["field"].startswith(field), err

        with subtests.test("a JSON tell sent as text/plain"), server.http() as fresh:
            r = fresh.post(
                f"{API}/trials/{tid}/tell",
                content=json.dumps({"value": 1.0}),
                headers={"content-type": "text/plain"},
            )
            err = assert_error(r, 422, field="body")
            assert "'text/plain'" in err["message"] and "application/json" in err["message"]
        with subtests.test("a JSON tell sent without a Content-Type"), server.http() as fresh:
            r = fresh.post(f"{API}/trials/{tid}/tell", content=json.dumps({"value": 1.0}))
            err = assert_error(r, 422, field="body")
            assert "without a Content-Type" in err["message"], err

        with subtests.test("state filter with a newline"), server.http() as fresh:
            r = fresh.get(f"{API}/studies/{sid}/trials", params={"state": "running\n"})
            assert r.status_code == 200, r.text
            assert [t["id"] for t in r.json()["trials"]] == [tid]
            again = fresh.get(
                f"{API}/studies/{sid}/trials",
                params={"state": "running\n"},
                headers={"If-None-Match": r.headers["etag"]},
            )
            assert again.status_code == 304

        after_trial = get_trial(http, tid)
        after_trial.pop("duration_s"), before_trial.pop("duration_s")
        assert after_trial == before_trial
        assert get_study(http, sid)["spec"]["budget"] == before_study["spec"]["budget"]
        points = http.get(f"{API}/trials/{tid}/metrics").json()["points"]
        assert [(p["step"], p["name"]) for p in points] == [(0, "loss")]


def test_lone_surrogates_are_422_naming_the_field_and_break_nothing(
    server: ServerProcess, subtests: pytest.Subtests
) -> None:
    """JSON can spell a lone UTF-16 surrogate, which no UTF-8 encoder takes. Stored, one in a
    define-by-run choice made its study unreadable and undeletable (every study list
    answered 422), and one in a trial's user_attrs made its study's reads and the study list
    answer 500, though each write itself answered 500. Every such body is a 422 naming the
    field, and changes nothing; a surrogate pair (one character) is taken."""
    lone = "\\ud800"  # in the JSON text: the escape itself
    with server.http() as http:
        sid = create(http, "surrogates", budget={"max_trials": 10})["id"]
        tid = ask(http, sid)["trial_id"]
        dbr = create(http, "dbr-surrogates", define_by_run=True, space={})["id"]
        dbr_tid = ask(http, dbr)["trial_id"]
        before = all_studies(http)
        before_trials = http.get(f"{API}/studies/{sid}/trials").json()
        cases = [
            (
                f"/trials/{dbr_tid}/suggest",
                '{"name": "c", "param": {"type": "categorical", "choices": ["%s", "b"]}}',
                "param.choices[0]",
            ),
            (f"/trials/{tid}/user_attrs", '{"sur": "%s"}', "sur"),
            (f"/trials/{tid}/user_attrs", '{"%s": 1}', lone),
            (
                f"/studies/{sid}/trials",
                '{"trials": [{"params": {"x": 0.5, "n": 2}, "value": 1, '
                '"user_attrs": {"a": "x%sy"}}]}',
                "trials[0].user_attrs.a",
            ),
            (
                "/studies",
                json.dumps(simple_spec("u"))[:-1] + ', "user_attrs": {"a": "%s"}}',
                "user_attrs.a",
            ),
            (
                "/studies",
                json.dumps(simple_spec("k"))[:-1] + ', "user_attrs": {"%s": 1}}',
                "user_attrs." + lone,
            ),
            (f"/studies/{sid}/ask", '{"params": {"x": "%s"}}', "params.x"),
            (f"/trials/{tid}/tell", '{"state": "failed", "error": "%s"}', "error"),
            (
                f"/trials/{tid}/metrics",
                '{"points": [{"step": 1, "name": "l%s", "value": 1.0}]}',
                "points[0].name",
            ),
        ]
        for path, body, field in cases:
            with subtests.test(f"POST {path} {body}"), server.http() as fresh:
                err = assert_error(fresh.post(API + path, content=body % lone, headers=JSON), 422)
                assert err["field"].startswith(field) and "surrogate" in err["message"], err
        with subtests.test("a UTF-16 body"), server.http() as fresh:
            # json.loads decodes UTF-16 (and -32) too, a raw lone surrogate with it
            for body in ('{"sur": "' + lone + '"}', '{"sur": "\ud800"}'):
                raw = body.encode("utf-16-le", "surrogatepass")
                r = fresh.post(f"{API}/trials/{tid}/user_attrs", content=raw, headers=JSON)
                assert assert_error(r, 422)["field"] == "body"
        with subtests.test("PATCH a study's user_attrs"), server.http() as fresh:
            err = assert_error(
                fresh.patch(
                    f"{API}/studies/{sid}",
                    content='{"user_attrs": {"a": "' + lone + '"}}',
                    headers=JSON,
                ),
                422,
            )
            assert err["field"] == "user_attrs.a", err

        # Nothing was stored, and everything still reads (and the study still deletes).
        assert all_studies(http) == before
        assert http.get(f"{API}/studies/{sid}/trials").json() == before_trials
        assert http.get(f"{API}/studies/{dbr}").json()["spec"]["space"] == {}
        assert http.get(f"{API}/studies/{sid}/export.csv").status_code == 200
        # A pair is one character (U+1F600): stored and answered as itself.
        paired = http.post(
            f"{API}/trials/{tid}/user_attrs", content='{"face": "\\ud83d\\ude00"}', headers=JSON
        )
        assert paired.status_code == 200, paired.text
        assert get_trial(http, tid)["user_attrs"] == {"face": "\U0001f600"}
        assert http.delete(f"{API}/studies/{dbr}").status_code == 204


def test_openapi_documents_the_error_answers(sqlite_server: ServerProcess) -> None:
    """Every API operation documents 404/409/422 as the JSON error body it really sends."""
    paths = httpx.get(sqlite_server.url + "/openapi.json").json()["paths"]
    for path, operations in paths.items():
        if not path.startswith(API):
            continue
        for method, op in operations.items():
            for status in ("401", "404", "409", "422"):
                schema = op["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path)


def test_values_near_the_float_limit_are_stored_and_answered(server: ServerProcess) -> None:
    """Finite values near ±1.8e308 overflowed where they were added up: the median pruner's
    threshold (-inf: PostgreSQL refused the JSON, a 500), the GP sampler's constant liar (a 500
    on ask) and the dashboard's importance (NaN, answered as null)."""
    big = 1.7e308
    with server.http() as http:
        sid = create(
            http,
            "huge",
            sampler={"type": "gp", "seed": 0, "n_startup_trials": 1},
            pruner={"type": "median", "min_steps": 1, "n_startup_trials": 0},
        )["id"]
        for _ in range(2):
            tid = ask(http, sid)["trial_id"]
            assert report(http, tid, 1, -big) is False
            assert tell(http, tid, value=big).status_code == 200
        pruned = ask(http, sid)["trial_id"]
        assert report(http, pruned, 1, 0.0) is True  # worse than the median, -1.7e308
        assert get_trial(http, pruned)["pruned"]["threshold"] == -big
        tid = ask(http, sid)["trial_id"]
        assert tell(http, tid, value=-big).status_code == 200

        ask(http, sid)  # pending: the next ask lies with the mean of the complete values
        ask(http, sid)

        r = http.get(f"{API}/studies/{sid}/importance")
        assert r.status_code == 200, r.text
        importances = r.json()["importances"]
        assert all(isinstance(v, float) for v in importances.values()), importances
        r = http.get(f"{API}/studies/{sid}/contour", params={"x": "x", "y": "n"})
        assert r.status_code == 200, r.text
        z = [v for row in r.json()["z"] for v in row]
        assert z and all(isinstance(v, float) and abs(v) <= big for v in z), z


def test_inputs_found_by_a_hostile_probe_are_4xx_naming_the_field(
    server: ServerProcess, subtests: pytest.Subtests
) -> None:
    """Each of these was a 500, a 503 that never ends, or data stored silently wrong."""
    with server.http() as http:
        with subtests.test("a run-time parameter with `when`"):
            sid = create(http, "dbr", define_by_run=True, space={})["id"]
            tid = ask(http, sid)["trial_id"]
            param = {"type": "int", "low": 1, "high": 2, "when": {"lr": [0.1]}}
            r = http.post(f"{API}/trials/{tid}/suggest", json={"name": "w", "param": param})
            assert_error(r, 422, field="param.when")
        with subtests.test("a run-time study asked with a structured value"):
            r = http.post(f"{API}/studies/{sid}/ask", json={"params": {"p": {"a": 1}}})
            assert_error(r, 422, field="params.p")

        with subtests.test("budget counts beyond 2**53"):
            for key in ("max_trials", "max_concurrent", "max_steps"):
                r = http.post(f"{API}/studies", json=simple_spec(f"big-{key}", budget={key: 2**63}))
                assert_error(r, 422, field=f"budget.{key}")

        with subtests.test("seconds and shares given as strings"):
            for over, field in [
                ({"budget": {"timeout_s": "100"}}, "budget.timeout_s"),
                ({"lease_s": "60"}, "lease_s"),
                ({"resources": {"cpus_per_worker": "1"}}, "resources.cpus_per_worker"),
            ]:
                r = http.post(f"{API}/studies", json=simple_spec("strings", **over))
                assert_error(r, 422, field=field)

        with subtests.test("steps of 2**62 summed under a step budget"):
            sid = create(http, "huge-steps")["id"]
            running = [ask(http, sid)["trial_id"] for _ in range(3)]
            for tid in running[:2]:
                report(http, tid, 2**62, 1.0)  # the two sum past 2**63
            r = http.patch(f"{API}/studies/{sid}", json={"budget": {"max_steps": 10}})
            assert r.status_code == 200, r.text
            assert_error(http.post(f"{API}/studies/{sid}/ask"), 409)  # spent, not a 503
            assert tell(http, running[2], value=0.5).status_code == 200

        float_step = {"x": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.5}}
        with subtests.test("a float off its step, asked, queued or imported"):
            sid = create(http, "lattice", space=float_step)["id"]
            off = {"params": {"x": 0.25}}
            assert_error(http.post(f"{API}/studies/{sid}/ask", json=off), 422, field="params.x")
            assert_error(http.post(f"{API}/studies/{sid}/queue", json=off), 422, field="params.x")
            body = {"trials": [{"params": {"x": 0.25}, "value": 1.0}]}
            r = http.post(f"{API}/studies/{sid}/trials", json=body)
            assert_error(r, 422, field="trials[0].params.x")
            on = http.post(f"{API}/studies/{sid}/ask", json={"params": {"x": 0.5}})
            assert on.status_code == 201 and on.json()["params"] == {"x": 0.5}, on.text

        conditional = {
            "k": {"type": "categorical", "choices": ["a", "b"]},
            "d": {"type": "int", "low": 1, "high": 3, "when": {"k": ["a"]}},
        }
        with subtests.test("imports with no parameter or an inactive one"):
            sid = create(http, "imports", space=conditional)["id"]
            for params, field in [
                ({}, "trials[0].params"),
                ({"k": "b", "d": 2}, "trials[0].params.d"),
            ]:
                body = {"trials": [{"params": params, "value": 0.0}]}
                r = http.post(f"{API}/studies/{sid}/trials", json=body)
                assert_error(r, 422, field=field)
            assert http.get(f"{API}/studies/{sid}/trials").json()["trials"] == []
            for row in [
                {"params": {}, "state": "failed"},  # a failure may come before any parameter
                {"params": {"k": "a"}, "value": 0.0},  # a warm start from a smaller space
            ]:
                r = http.post(f"{API}/studies/{sid}/trials", json={"trials": [row]})
                assert r.status_code == 201, r.text

        with subtests.test("an ask that fixes an inactive parameter, or a child alone"):
            r = http.post(f"{API}/studies/{sid}/ask", json={"params": {"k": "b", "d": 2}})
            assert_error(r, 422, field="params.d")
            r = http.post(f"{API}/studies/{sid}/ask", json={"params": {"d": 2}})
            assert_error(r, 422, field="params.k")  # every time, not when k is drawn "b"

        with subtests.test("a grid study's trials asked, queued or imported off their point"):
            grid = {"x": {"type": "int", "low": 0, "high": 4, "step": 2}}  # points 0, 2, 4
            gid = create(http, "grid", sampler={"type": "grid"}, space=grid)["id"]
            first = http.post(f"{API}/studies/{gid}/ask", json={"params": {"x": 0}})
            assert first.status_code == 201 and first.json()["params"] == {"x": 0}, first.text
            again = {"params": {"x": 0}}  # trial 1 runs point 1 (x=2): x=0 would skip it
            assert_error(http.post(f"{API}/studies/{gid}/ask", json=again), 422, field="params.x")
            assert_error(http.post(f"{API}/studies/{gid}/queue", json=again), 422, field="params.x")
            for params, field in [({"x": 4}, "trials[0].params.x"), ({}, "trials[0].params.x")]:
                body = {"trials": [{"params": params, "state": "failed"}]}
                r = http.post(f"{API}/studies/{gid}/trials", json=body)
                assert_error(r, 422, field=field)
            on_point = {"trials": [{"params": {"x": 2}, "value": 1.0}]}
            assert http.post(f"{API}/studies/{gid}/trials", json=on_point).status_code == 201
            assert ask(http, gid)["params"] == {"x": 4}
            assert_error(http.post(f"{API}/studies/{gid}/ask"), 409, code="grid_exhausted")
            ran = http.get(f"{API}/studies/{gid}/trials").json()["trials"]
            assert sorted(t["params"]["x"] for t in ran) == [0, 2, 4]  # every point, once

        with subtests.test("a NUL in the names a dashboard query filters by"):
            for path, query, field in [
                (f"/studies/{sid}/curves", {"metric": "a\u0000"}, "query.metric"),
                (f"/studies/{sid}/contour", {"x": "k\u0000", "y": "d"}, "query.x"),
            ]:
                assert_error(http.get(API + path, params=query), 422, field=field)

        with subtests.test("a hyperband whose max_steps is below its min_steps"):
            pruner = {"type": "hyperband", "min_steps": 10, "max_steps": 5}
            r = http.post(f"{API}/studies", json=simple_spec("hb", pruner=pruner))
            assert_error(r, 422, field="pruner.max_steps")

        with subtests.test("a best checkpoint of a study with no one best trial says why"):
            objectives = [{"metric": "a"}, {"metric": "b"}]
            two = create(http, "two-objectives", objective=objectives)["id"]
            asked = ask(http, two)
            r = http.post(f"{API}/trials/{asked['trial_id']}/tell", json={"values": [1.0, 2.0]})
            assert r.status_code == 200, r.text
            r = http.get(f"{API}/studies/{two}/best/checkpoint")
            err = assert_error(r, 404, field="study_id")
            assert "several objectives" in err["message"], err
            fresh = create(http, "nothing-complete")["id"]
            r = http.get(f"{API}/studies/{fresh}/best/checkpoint")
            assert "no trial is complete" in assert_error(r, 404)["message"]

        with subtests.test("values off their step's lattice name the parameter"):
            space = {"b": {"type": "int", "low": 16, "high": 128, "step": 16, "values": [24]}}
            r = http.post(f"{API}/studies", json=simple_spec("lattice", space=space))
            assert "value 24 in `values`" in assert_error(r, 422, field="space.b")["message"]

        with subtests.test("a mutable parameter without a scheduler names the parameter"):
            space = {"lr": {"type": "float", "low": 0.1, "high": 1.0, "mutable": True}}
            r = http.post(f"{API}/studies", json=simple_spec("mut", space=space))
            assert_error(r, 422, field="space.lr.mutable")
