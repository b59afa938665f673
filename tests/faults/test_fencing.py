"""Drills: writes fenced by their attempt, and replayed requests stored once.

An attempt's token can report, heartbeat and tell its own trial only, and only while that
attempt is current: the late writes of an attempt whose lease expired are answered 409 and
stored nowhere, and the live attempt is never blocked by them. A metrics batch sent twice (a
retry whose answer was lost) stores its points once.
"""

from __future__ import annotations

from collections import Counter

from tests.conftest import ServerProcess, simple_spec, wait_for


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_late_writes_of_an_expired_attempt_are_refused_and_stored_nowhere(
    server: ServerProcess,
) -> None:
    with server.http() as http:
        study = http.post(
            "/api/v1/studies", json=simple_spec("fenced", lease_s=2, max_retries=1)
        ).json()
        first = http.post(f"/api/v1/studies/{study['id']}/ask").json()
        trial_id, old = first["trial_id"], first["attempt_token"]
        wait_for(
            lambda: http.get(f"/api/v1/trials/{trial_id}").json()["state"] == "waiting",
            timeout=30,
            what="the first attempt's lease to expire",
        )
        second = http.post(f"/api/v1/studies/{study['id']}/ask").json()
        assert (second["trial_id"], second["attempt"]) == (trial_id, 2)
        new = second["attempt_token"]
        assert new != old

        late = [
            http.post(
                f"/api/v1/trials/{trial_id}/metrics",
                json={"points": [{"step": 1, "name": "loss", "value": 9.0}]},
                headers=_bearer(old),
            ),
            http.post(f"/api/v1/trials/{trial_id}/heartbeat", headers=_bearer(old)),
            http.post(f"/api/v1/trials/{trial_id}/tell", json={"value": 9.0}, headers=_bearer(old)),
        ]
        accepted = [r.status_code for r in late if r.status_code < 400]
        assert accepted == [], [r.text for r in late]
        assert {r.status_code for r in late} == {409}
        assert all("attempt" in r.json()["message"] for r in late)

        live = http.post(
            f"/api/v1/trials/{trial_id}/metrics",
            json={"points": [{"step": 1, "name": "loss", "value": 0.5}]},
            headers=_bearer(new),
        )
        assert live.status_code == 200, live.text
        told = http.post(
            f"/api/v1/trials/{trial_id}/tell", json={"value": 0.5}, headers=_bearer(new)
        )
        assert told.status_code == 200, told.text
        trial = http.get(f"/api/v1/trials/{trial_id}").json()
        points = http.get(f"/api/v1/trials/{trial_id}/metrics").json()["points"]
    assert (trial["state"], trial["value"]) == ("complete", 0.5)
    assert [(p["step"], p["value"]) for p in points] == [(1, 0.5)]


def test_an_attempt_token_reaches_its_own_trial_only(server: ServerProcess) -> None:
    with server.http() as http:
        a = http.post("/api/v1/studies", json=simple_spec("mine")).json()
        b = http.post("/api/v1/studies", json=simple_spec("theirs")).json()
        mine = http.post(f"/api/v1/studies/{a['id']}/ask").json()
        theirs = http.post(f"/api/v1/studies/{b['id']}/ask").json()
        token = _bearer(mine["attempt_token"])
        refused = [
            http.delete(f"/api/v1/studies/{b['id']}", headers=token),
            http.patch(f"/api/v1/studies/{b['id']}", json={"state": "stopped"}, headers=token),
            http.post("/api/v1/studies", json=simple_spec("new"), headers=token),
            http.post(f"/api/v1/studies/{a['id']}/ask", headers=token),
            http.post(
                f"/api/v1/trials/{theirs['trial_id']}/tell", json={"value": 1.0}, headers=token
            ),
        ]
        assert [r.status_code for r in refused] == [403] * len(refused), [r.text for r in refused]
        assert http.get(f"/api/v1/studies/{b['id']}").json()["state"] == "running"
        assert http.get(f"/api/v1/trials/{theirs['trial_id']}").json()["state"] == "running"
        ok = http.post(
            f"/api/v1/trials/{mine['trial_id']}/tell", json={"value": 1.0}, headers=token
        )
        assert ok.status_code == 200, ok.text


def test_a_replayed_metrics_batch_stores_each_point_once(server: ServerProcess) -> None:
    with server.http() as http:
        study = http.post("/api/v1/studies", json=simple_spec("replayed")).json()
        trial = http.post(f"/api/v1/studies/{study['id']}/ask").json()
        token = _bearer(trial["attempt_token"])
        for step in range(1, 21):
            body = {
                "points": [
                    {"step": step, "name": "loss", "value": 1 / step},
                    {"step": step, "name": "acc", "value": step / 20},
                ]
            }
            for _ in range(2):  # every batch sent twice, as a retry after a lost answer is
                r = http.post(
                    f"/api/v1/trials/{trial['trial_id']}/metrics", json=body, headers=token
                )
                assert r.status_code == 200, r.text
        points = http.get(f"/api/v1/trials/{trial['trial_id']}/metrics").json()["points"]
    per_key = Counter((p["name"], p["step"]) for p in points)
    assert len(points) == 40
    assert max(per_key.values()) == 1
