"""Exactly once over real HTTP: an ask's Idempotency-Key, attempt tokens and their reach,
and metric points read back one per (name, step), the newest attempt's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import ServerProcess, simple_spec, wait_for


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _ask(http: httpx.Client, study_id: int, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return http.post(f"/api/v1/studies/{study_id}/ask", headers=headers)


def test_a_repeated_idempotency_key_answers_the_same_trial(server: ServerProcess) -> None:
    with server.http() as http:
        study = http.post("/api/v1/studies", json=simple_spec("again")).json()
        first = _ask(http, study["id"], "ask-1").json()
        again = _ask(http, study["id"], "ask-1").json()
        assert {k: again[k] for k in ("trial_id", "number", "params", "attempt")} == {
            k: first[k] for k in ("trial_id", "number", "params", "attempt")
        }
        assert http.get(f"/api/v1/studies/{study['id']}").json()["n_trials"] == 1
        told = http.post(
            f"/api/v1/trials/{again['trial_id']}/tell",
            json={"value": 1.0},
            headers=_bearer(again["attempt_token"]),
        )
        assert told.status_code == 200, told.text
        finished = _ask(http, study["id"], "ask-1")
        assert finished.status_code == 409
        assert finished.json()["field"] == "Idempotency-Key"
        other = _ask(http, study["id"], "ask-2").json()
    assert other["trial_id"] != first["trial_id"] and other["number"] == 1


def test_concurrent_asks_with_one_key_create_one_trial(server: ServerProcess) -> None:
    with server.http() as http:
        study = http.post("/api/v1/studies", json=simple_spec("racing")).json()

        def ask(_: int) -> httpx.Response:
            with server.http() as own:
                return _ask(own, study["id"], "the-same-key")

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        assert [a.status_code for a in answers] == [201] * 8, [a.text for a in answers]
        trials = http.get(f"/api/v1/studies/{study['id']}/trials").json()["trials"]
    assert {a.json()["trial_id"] for a in answers} == {t["id"] for t in trials}
    assert len(trials) == 1


def test_a_burst_of_asks_to_one_server_gets_a_trial_each(server: ServerProcess) -> None:
    """64 asks of one study at once, through one server: each gets its own trial, numbered 0
    to 63 without a gap. (Racing each other for the next number, some ran out of attempts
    and were answered 409 "too many concurrent asks"; a server's asks of a study now take
    turns.)"""
    with server.http() as http:
        study = http.post("/api/v1/studies", json=simple_spec("burst")).json()

        def ask(_: int) -> httpx.Response:
            with server.http() as own:
                return own.post(f"/api/v1/studies/{study['id']}/ask")

        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(ask, range(64)))
        codes = [a.status_code for a in answers]
        assert codes == [201] * 64, [a.text for a in answers if a.status_code != 201][:3]
        assert sorted(a.json()["number"] for a in answers) == list(range(64))
        assert http.get(f"/api/v1/studies/{study['id']}").json()["n_trials"] == 64


def test_an_idempotency_key_is_checked(server: ServerProcess) -> None:
    with server.http() as http:
        study = http.post("/api/v1/studies", json=simple_spec("keyed")).json()
        for key in ("k" * 201, ""):
            r = _ask(http, study["id"], key)
            assert r.status_code == 422
            assert r.json()["field"] == "header.Idempotency-Key"
        assert http.get(f"/api/v1/studies/{study['id']}").json()["n_trials"] == 0


def test_an_attempt_token_reads_its_own_trial_only(server: ServerProcess) -> None:
    with server.http() as http:
        study = http.post("/api/v1/studies", json=simple_spec("reader")).json()
        mine = _ask(http, study["id"]).json()
        theirs = _ask(http, study["id"]).json()
        token = _bearer(mine["attempt_token"])
        own = [
            http.get(f"/api/v1/trials/{mine['trial_id']}", headers=token),
            http.get(f"/api/v1/trials/{mine['trial_id']}/metrics?name=loss", headers=token),
            http.post(f"/api/v1/trials/{mine['trial_id']}/heartbeat", headers=token),
        ]
        assert [r.status_code for r in own] == [200] * 3, [r.text for r in own]
        others = [
            http.get(f"/api/v1/trials/{theirs['trial_id']}", headers=token),
            http.get(f"/api/v1/studies/{study['id']}", headers=token),
            http.get("/api/v1/studies", headers=token),
        ]
        assert [r.status_code for r in others] == [403] * 3, [r.text for r in others]
        forged = mine["attempt_token"][:-4] + "abcd"
        r = http.get(f"/api/v1/trials/{mine['trial_id']}", headers=_bearer(forged))
        assert r.status_code == 401


def test_points_of_a_step_are_read_from_the_newest_attempt(server: ServerProcess) -> None:
    with server.http() as http:
        study = http.post(
            "/api/v1/studies", json=simple_spec("resumed", lease_s=2, max_retries=1)
        ).json()
        first = _ask(http, study["id"]).json()
        trial_id = first["trial_id"]
        points = [{"step": s, "name": "loss", "value": 10.0 + s} for s in range(3)]
        r = http.post(
            f"/api/v1/trials/{trial_id}/metrics",
            json={"points": points},
            headers=_bearer(first["attempt_token"]),
        )
        assert r.status_code == 200, r.text
        wait_for(
            lambda: http.get(f"/api/v1/trials/{trial_id}").json()["state"] == "waiting",
            timeout=30,
            what="the first attempt's lease to expire",
        )
        second = _ask(http, study["id"]).json()
        assert second["attempt"] == 2
        again = [{"step": s, "name": "loss", "value": 20.0 + s} for s in range(2)]
        # An admin write that names a stale attempt is refused; one naming the current is not.
        stale = http.post(
            f"/api/v1/trials/{trial_id}/metrics", json={"points": again, "attempt": 1}
        )
        assert stale.status_code == 409 and "attempt 1" in stale.json()["message"]
        r = http.post(f"/api/v1/trials/{trial_id}/metrics", json={"points": again, "attempt": 2})
        assert r.status_code == 200, r.text
        # the same step again with another value, by the same attempt: the first value wins
        changed = [{"step": 0, "name": "loss", "value": 99.0}]
        r = http.post(f"/api/v1/trials/{trial_id}/metrics", json={"points": changed, "attempt": 2})
        assert r.status_code == 200, r.text
        read = http.get(f"/api/v1/trials/{trial_id}/metrics").json()["points"]
    assert [(p["step"], p["value"], p["attempt"]) for p in read] == [
        (0, 20.0, 2),
        (1, 21.0, 2),
        (2, 12.0, 1),
    ]
