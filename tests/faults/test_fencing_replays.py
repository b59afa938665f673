"""Drills: the fence holds for writes that name no attempt, for a replayed ask, and for a big
batch refused halfway.

- An API-token write (metrics, heartbeat, tell) that names no attempt is accepted only while
  the trial is on its first attempt; once the trial was handed out again it is a 409 telling
  to send the attempt's token or name the ``attempt`` (an old client stalled past its lease
  cannot finish the live attempt). The scheduler's in-process calls are not fenced so.
- A replayed Idempotency-Key answers its trial again only while the trial runs the attempt
  that key's ask claimed; a replay never takes over another asker's attempt, and claims a
  waiting trial only when a plain ask could (study running, concurrency limit); a used key
  sent with other fixed params is refused (409), not answered with the first trial.
- A batch answered 409 ("nothing was stored") leaves nothing stored, even when it was
  stored in several commits and only a later one was refused.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from hpo.api.client import AskedTrial
from hpo.service.errors import Conflict
from hpo.service.studies import StudyService
from tests.conftest import ServerProcess, simple_spec, wait_for


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _study(http: httpx.Client, name: str, **overrides: object) -> int:
    r = http.post("/api/v1/studies", json=simple_spec(name, **overrides))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _ask(http: httpx.Client, study_id: int, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return http.post(f"/api/v1/studies/{study_id}/ask", headers=headers)


def _state(http: httpx.Client, trial_id: int) -> dict:
    return http.get(f"/api/v1/trials/{trial_id}").json()


def _wait_waiting(http: httpx.Client, trial_id: int) -> None:
    wait_for(
        lambda: _state(http, trial_id)["state"] == "waiting",
        timeout=30,
        what="the first attempt's lease to expire",
    )


def test_api_token_writes_naming_no_attempt_are_fenced_once_handed_out_again(
    server: ServerProcess,
) -> None:
    one = [{"step": 1, "name": "loss", "value": 99.0}]
    with server.http() as http:  # the API token
        sid = _study(http, "unnamed", lease_s=1.0, max_retries=1)
        tid = _ask(http, sid).json()["trial_id"]
        # First attempt: an old client's writes (API token, no attempt) still work.
        assert http.post(f"/api/v1/trials/{tid}/heartbeat").status_code == 200
        r = http.post(f"/api/v1/trials/{tid}/metrics", json={"points": one})
        assert r.status_code == 200, r.text
        _wait_waiting(http, tid)
        live = _ask(http, sid).json()
        assert (live["trial_id"], live["attempt"]) == (tid, 2)

        late = [
            http.post(
                f"/api/v1/trials/{tid}/metrics",
                json={"points": [{"step": 2, "name": "loss", "value": 99.0}]},
            ),
            http.post(f"/api/v1/trials/{tid}/heartbeat"),
            http.post(f"/api/v1/trials/{tid}/tell", json={"value": 99.0}),
        ]
        assert [r.status_code for r in late] == [409] * 3, [r.text for r in late]
        for r in late:
            assert r.json()["error"] == "stale_attempt"
            assert "token" in r.json()["message"] and "`attempt`" in r.json()["message"]

        # Naming the attempt: the stale one is refused, the current one goes through.
        assert http.post(f"/api/v1/trials/{tid}/heartbeat?attempt=1").status_code == 409
        assert http.post(f"/api/v1/trials/{tid}/heartbeat?attempt=2").status_code == 200
        assert http.post(f"/api/v1/trials/{tid}/heartbeat?attempt=0").status_code == 422
        told = http.post(
            f"/api/v1/trials/{tid}/tell",
            json={"value": 0.1},
            headers=_bearer(live["attempt_token"]),
        )
        assert told.status_code == 200, told.text
        final = _state(http, tid)
        points = http.get(f"/api/v1/trials/{tid}/metrics").json()["points"]
    assert (final["state"], final["value"]) == ("complete", 0.1)
    assert [(p["step"], p["attempt"]) for p in points] == [(1, 1)]  # step 2 stored nowhere


def test_the_client_names_the_attempt_it_was_asked_for(server: ServerProcess) -> None:
    client = server.client()  # the API token
    with server.http() as http:
        sid = _study(http, "client", lease_s=1.0, max_retries=1)
        tid = _ask(http, sid).json()["trial_id"]
        _wait_waiting(http, tid)
        _ask(http, sid)  # attempt 2 is current
    study = client.study(sid)
    # References without a token: the client sends its API token and names the attempt.
    stale, current = AskedTrial(trial_id=tid, attempt=1), AskedTrial(trial_id=tid, attempt=2)
    with pytest.raises(Conflict, match="attempt 1"):
        study.report(stale, 1, {"loss": 9.0})
    with pytest.raises(Conflict, match="attempt 1"):
        study.heartbeat(stale)
    with pytest.raises(Conflict, match="attempt 1"):
        study.tell(stale, 9.0)
    assert study.report(current, 1, {"loss": 0.5}) is False
    assert study.heartbeat(current) is False
    assert study.tell(current, 0.5).value == 0.5


def test_the_scheduler_s_own_writes_are_not_fenced_by_attempt(service: StudyService) -> None:
    from hpo.service.spec import StudySpec

    spec = StudySpec.model_validate(simple_spec("inproc", lease_s=0.2, max_retries=1))
    study = service.create_study(spec)
    trial = service.ask(study.id)
    time.sleep(0.4)
    again = service.ask(study.id)  # expires the lease and claims attempt 2
    assert (again.id, again.attempts) == (trial.id, 2)
    service.heartbeat(trial.id)
    assert service.tell(trial.id, value=0.3).value == 0.3


def test_a_replayed_key_never_takes_over_another_askers_attempt(server: ServerProcess) -> None:
    with server.http() as http:
        sid = _study(http, "hijack", lease_s=1.0, max_retries=3)
        tid = _ask(http, sid, "KA").json()["trial_id"]
        _wait_waiting(http, tid)
        b = _ask(http, sid, "KB").json()
        assert (b["trial_id"], b["attempt"]) == (tid, 2)

        replay = _ask(http, sid, "KA")  # the stale asker retries its ask
        assert replay.status_code == 409, replay.text
        assert replay.json()["field"] == "Idempotency-Key"
        assert "handed out again" in replay.json()["message"]
        # The live attempt B keeps working with its token: the replay issued none.
        r = http.post(
            f"/api/v1/trials/{tid}/metrics",
            json={"points": [{"step": 1, "name": "loss", "value": 0.4}]},
            headers=_bearer(b["attempt_token"]),
        )
        assert r.status_code == 200, r.text
        told = http.post(
            f"/api/v1/trials/{tid}/tell", json={"value": 0.4}, headers=_bearer(b["attempt_token"])
        )
        assert told.status_code == 200, told.text
        assert http.get(f"/api/v1/studies/{sid}").json()["n_trials"] == 1


def test_a_replayed_key_claims_its_waiting_trial_only_as_a_plain_ask_could(
    server: ServerProcess,
) -> None:
    with server.http() as http:
        sid = _study(http, "paused", lease_s=1.0, max_retries=2)
        tid = _ask(http, sid, "K").json()["trial_id"]
        _wait_waiting(http, tid)
        assert http.patch(f"/api/v1/studies/{sid}", json={"state": "paused"}).status_code == 200
        plain, replay = _ask(http, sid), _ask(http, sid, "K")
        assert (plain.status_code, replay.status_code) == (409, 409), replay.text
        assert replay.json()["error"] == "study_not_running"
        assert _state(http, tid)["state"] == "waiting"

        assert http.patch(f"/api/v1/studies/{sid}", json={"state": "running"}).status_code == 200
        resumed = _ask(http, sid, "K")  # the asker retrying after a lost answer gets it back
        assert resumed.status_code == 201, resumed.text
        assert (resumed.json()["trial_id"], resumed.json()["attempt"]) == (tid, 2)
        assert _state(http, tid)["state"] == "running"


def test_a_replayed_key_respects_the_concurrency_limit(server: ServerProcess) -> None:
    with server.http() as http:
        sid = _study(http, "limited", lease_s=1.0, max_retries=2, budget={"max_concurrent": 2})
        tid = _ask(http, sid, "K").json()["trial_id"]
        other = _ask(http, sid).json()
        beat = f"/api/v1/trials/{other['trial_id']}/heartbeat"
        alive = _bearer(other["attempt_token"])

        def first_waits_while_other_runs() -> bool:
            assert http.post(beat, headers=alive).status_code == 200
            return _state(http, tid)["state"] == "waiting"

        wait_for(first_waits_while_other_runs, timeout=30, what="the first lease to expire")
        patch = {"budget": {"max_concurrent": 1}}  # the other trial now holds the only slot
        assert http.patch(f"/api/v1/studies/{sid}", json=patch).status_code == 200
        assert http.post(beat, headers=alive).status_code == 200
        plain, replay = _ask(http, sid), _ask(http, sid, "K")
        assert (plain.status_code, replay.status_code) == (409, 409), replay.text
        assert replay.json()["error"] == "concurrency_limit"
        assert _state(http, tid)["state"] == "waiting"


POINTS = 10_000  # the batch cap: stored in 10 commits of 1,000


def _race_a_big_batch(server: ServerProcess, name: str, delay: float) -> tuple[int, int]:
    """The first attempt posts a POINTS batch ``delay`` s into its 1 s lease while another
    asker claims the next attempt as soon as it can. Returns the batch's answer and how many
    points of the first attempt are stored."""
    with server.http() as http:
        sid = _study(http, name, lease_s=1.0, max_retries=1)
        first = _ask(http, sid).json()
        tid = first["trial_id"]
        body = {"points": [{"step": s, "name": "loss", "value": 1.0} for s in range(POINTS)]}
        answer: list[int] = []

        def post() -> None:
            with server.http(first["attempt_token"]) as own:
                answer.append(own.post(f"/api/v1/trials/{tid}/metrics", json=body).status_code)

        time.sleep(delay)
        poster = threading.Thread(target=post)
        poster.start()
        while poster.is_alive():
            _ask(http, sid)
            time.sleep(0.02)
        poster.join()
        stored = http.get(f"/api/v1/trials/{tid}/metrics").json()["points"]
        last_step = http.get(f"/api/v1/trials/{tid}").json()["last_step"]
        curves = http.get(f"/api/v1/studies/{sid}/curves").json()["series"]
    in_curves = sum(len(c["steps"]) for c in curves if c["trial_id"] == tid)
    return answer[0], sum(1 for p in stored if p["attempt"] == 1), last_step, in_curves


def test_a_big_batch_refused_409_leaves_nothing_stored(server: ServerProcess) -> None:
    """Nothing of a batch refused in a later commit stays: not its points, not the step they
    took the trial to (what budget.max_steps charges), not its learning curve at rest."""
    rounds = [
        (delay, *_race_a_big_batch(server, f"race{i}", delay))
        for i, delay in enumerate((0.8, 0.85, 0.9, 0.95, 1.0, 0.75))
    ]
    refused = [r for r in rounds if r[1] == 409]
    assert refused, f"no batch raced the lease (delay, code, stored, step, curve): {rounds}"
    assert [r for r in refused if r[2:] != (0, None, 0)] == [], f"refused but kept: {rounds}"
    assert all(r[2:] in ((0, None, 0), (POINTS, POINTS - 1, r[4])) for r in rounds), rounds
    assert all(r[4] > 0 for r in rounds if r[2]), rounds


def test_a_used_key_with_other_fixed_params_is_a_409_and_creates_nothing(
    server: ServerProcess,
) -> None:
    with server.http() as http:
        sid = _study(http, "key-params")
        ask = f"/api/v1/studies/{sid}/ask"
        key = {"Idempotency-Key": "zz9"}
        first = http.post(ask, headers=key, json={"params": {"x": 1.0}})
        assert first.status_code == 201, first.text
        replayed = http.post(ask, headers=key, json={"params": {"x": 1.0}})
        assert (
            replayed.status_code == 201 and replayed.json()["trial_id"] == first.json()["trial_id"]
        )
        other = http.post(ask, headers=key, json={"params": {"x": -4.0}})
        assert other.status_code == 409, other.text
        assert other.json()["field"] == "Idempotency-Key" and "zz9" in other.json()["message"]
        listed = http.get(f"/api/v1/studies/{sid}/trials").json()["trials"]
        assert [(t["id"], t["params"]["x"]) for t in listed] == [(first.json()["trial_id"], 1.0)]
