"""Drills: writes fenced by their attempt, and replayed requests stored once.

An attempt's token can report, heartbeat and tell its own trial only, and only while that
attempt is current: the late writes of an attempt whose lease expired are answered 409 and
stored nowhere, and the live attempt is never blocked by them, also on a second server that
has just seen the old token current. A metrics batch sent twice (a retry whose answer was lost)
stores its points once.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from hpo.api.deps import ATTEMPT_VERIFIED_S
from tests.conftest import ServerProcess, assert_each_point_stored_once, simple_spec, wait_for


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
    # counted in the table, not through the API's read (it shows a step's newest attempt
    # only, which would hide a stale row of attempt 1 under the live attempt's)
    stored = assert_each_point_stored_once(server.database_url, trial_id, 1)
    assert set(stored) == {(2, "loss", 1)}


def test_a_server_that_remembers_a_token_refuses_it_once_another_server_reissued_the_trial(
    db_url: str, tmp_path: Path
) -> None:
    """Server A has just found attempt 1's token current (and remembers that for
    ATTEMPT_VERIFIED_S on the report and heartbeat routes); the lease expires and server B hands
    the trial out again as attempt 2. Attempt 1's late report and heartbeat to A, inside that
    window, are refused 409 by the write itself and store nothing."""
    a = ServerProcess(db_url, tmp_path / "a", {"HPO_SCHEDULER": "false"})
    b = ServerProcess(db_url, tmp_path / "b", {"HPO_SCHEDULER": "false"})
    b.token = a.token
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with a, b, a.http() as on_a, b.http() as on_b:
        study = on_a.post("/api/v1/studies", json=simple_spec("two", lease_s=1, max_retries=1))
        first = on_a.post(f"/api/v1/studies/{study.json()['id']}/ask").json()
        trial_id, old = first["trial_id"], first["attempt_token"]
        metrics = f"/api/v1/trials/{trial_id}/metrics"

        def point(step: int, value: float) -> dict:
            return {"points": [{"step": step, "name": "loss", "value": value}]}

        seen = on_a.post(metrics, json=point(1, 1.0), headers=_bearer(old))
        assert seen.status_code == 200, seen.text  # A found the token current: it remembers it
        remembered = time.monotonic()
        wait_for(
            lambda: on_b.get(f"/api/v1/trials/{trial_id}").json()["state"] == "waiting",
            timeout=ATTEMPT_VERIFIED_S,
            what="attempt 1's lease to expire",
        )
        second = on_b.post(f"/api/v1/studies/{study.json()['id']}/ask").json()
        assert (second["trial_id"], second["attempt"]) == (trial_id, 2)
        late = [
            on_a.post(metrics, json=point(2, 9.0), headers=_bearer(old)),
            on_a.post(f"/api/v1/trials/{trial_id}/heartbeat", headers=_bearer(old)),
        ]
        # still inside A's window: the write, not A's memory of the token, refused them
        assert time.monotonic() - remembered < ATTEMPT_VERIFIED_S
        assert [r.status_code for r in late] == [409, 409], [r.text for r in late]
        new = _bearer(second["attempt_token"])
        assert on_a.post(metrics, json=point(2, 0.5), headers=new).status_code == 200
        assert on_b.post(metrics, json=point(3, 0.4), headers=new).status_code == 200
        points = on_b.get(metrics).json()["points"]
        trial = on_a.get(f"/api/v1/trials/{trial_id}").json()
    assert [(p["step"], p["value"]) for p in points] == [(1, 1.0), (2, 0.5), (3, 0.4)]
    assert (trial["state"], trial["attempts"], trial["last_step"]) == ("running", 2, 3)
    stored = assert_each_point_stored_once(db_url, trial_id, 3)  # the table, not the read
    assert set(stored) == {(1, "loss", 1), (2, "loss", 2), (2, "loss", 3)}


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
    # the read above keeps one point per (name, step) whatever is stored: count the rows
    stored = assert_each_point_stored_once(server.database_url, trial["trial_id"], 40)
    assert set(stored) == {(1, n, s) for n in ("loss", "acc") for s in range(1, 21)}
