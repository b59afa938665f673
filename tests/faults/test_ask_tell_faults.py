"""Drills for the ask/tell path under faults, counting what is lost, duplicated or wrongly
accepted: keyed asks with clashing params through two servers on one database, a 20-s
database outage under a client's ask/tell loop, and a kill -9 of the server in the middle of
an ask loop (the lease of the trial it had just handed out expires after the restart)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, assert_each_point_stored_once, simple_spec
from tests.faults.conftest import OwnPostgres


def test_keyed_asks_with_clashing_params_through_two_servers_make_one_trial(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    off = {"HPO_SCHEDULER": "false"}
    with ServerProcess(url, tmp_path / "a", off) as a, ServerProcess(url, tmp_path / "b", off) as b:
        with a.http() as http:
            sid = http.post("/api/v1/studies", json=simple_spec("clash")).json()["id"]

        def one(i: int) -> tuple[int, float | None]:
            srv = (a, b)[i % 2]
            x = 1.0 if i % 4 < 2 else -4.0
            r = httpx.post(
                f"{srv.url}/api/v1/studies/{sid}/ask",
                json={"params": {"x": x}},
                headers={"Authorization": f"Bearer {srv.token}", "Idempotency-Key": "k"},
                timeout=60,
            )
            return r.status_code, (r.json()["params"]["x"] if r.status_code == 201 else None)

        for _round in range(5):
            with ThreadPoolExecutor(16) as pool:
                got = list(pool.map(one, range(32)))
            codes = Counter(c for c, _ in got)
            assert set(codes) <= {201, 409}, codes
            with a.http() as http:
                trials = http.get(f"/api/v1/studies/{sid}/trials").json()["trials"]
            assert len(trials) == 1, trials
            won = trials[0]["params"]["x"]
            assert all(x == won for c, x in got if c == 201)
            assert codes[409] == 16, codes  # every ask with the other params refused


def test_a_20_s_outage_under_an_ask_tell_loop_loses_and_doubles_nothing(
    own_postgres: OwnPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's own ask/tell loop and an Optuna script on ``hpo.optuna`` (define-by-run
    suggestions, reports, pruning checks) run through the same 20-s outage."""
    import hpo.optuna as optuna
    from hpo.api.client import Client

    with ServerProcess(own_postgres.url, tmp_path, {"HPO_SCHEDULER": "false"}) as server:
        client = Client(server.url, token=server.token)
        study = client.create_study(simple_spec("outage-loop", lease_s=600))
        done, errors, health = [], [], Counter()
        stop = threading.Event()
        monkeypatch.setenv("HPO_TOKEN", server.token)
        ported = optuna.create_study(storage=server.url, study_name="outage-optuna")
        objectives: list[int] = []  # numbers of the trials whose objective ran to its end

        def objective(trial: optuna.Trial) -> float:
            x = trial.suggest_float("x", -10, 10)
            for step in range(3):
                trial.report(x * x + 3 - step, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
                time.sleep(0.05)
            objectives.append(trial.number)
            return x * x

        def stop_when_told(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
            if stop.is_set():
                study.stop()

        def optimize() -> None:
            try:
                ported.optimize(objective, callbacks=[stop_when_told])
            except Exception as exc:
                errors.append(f"optimize: {exc!r}"[:200])

        def loop() -> None:
            while not stop.is_set():
                try:
                    t = study.ask()
                    study.tell(t, value=t.params["x"] ** 2)
                    done.append(t.number)
                except Exception as exc:
                    errors.append(repr(exc)[:200])
                    time.sleep(0.5)

        def poll() -> None:
            while not stop.is_set():
                try:
                    health[httpx.get(server.url + "/healthz", timeout=10).status_code] += 1
                except httpx.TransportError:
                    health["dropped"] += 1
                time.sleep(0.2)

        threads = [threading.Thread(target=f) for f in (loop, poll, optimize)]
        for t in threads:
            t.start()
        time.sleep(2)
        own_postgres.stop("immediate")
        before_outage = len(done)
        optuna_before = len(objectives)
        time.sleep(20)
        own_postgres.start()
        at_return = len(done)  # (an ask or tell retried through the outage ends after it)
        time.sleep(8)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a client thread never finished"
        trials = study.trials()
        numbers = sorted(t.number for t in trials)
        assert errors == [], errors  # the client retried every 503 by itself
        assert before_outage > 0, "no trial before the outage: the loop never ran"
        # the loop went on once the database was back: more than the one retried through it
        assert len(done) > at_return + 1, (before_outage, at_return, len(done))
        assert numbers == list(range(len(numbers))), "gap or duplicate numbers"
        assert len(set(done)) == len(done)
        told = [t for t in trials if t.state == "complete"]
        running = [t for t in trials if t.state == "running"]
        assert len(told) + len(running) == len(trials) and len(running) <= 1, [
            t.state for t in trials
        ]
        assert health[503] > 0 and 500 not in health and health["dropped"] == 0, health
        # The Optuna script went on through the outage: every trial it started ended
        # (complete, or pruned by the server's pruner), one number each, no gap; each
        # trial's reports stored once per step.
        ran = ported.get_trials(deepcopy=False)
        assert optuna_before > 0 and len(objectives) > optuna_before + 1, (
            optuna_before,
            len(objectives),
        )
        assert sorted(t.number for t in ran) == list(range(len(ran)))
        assert {t.state for t in ran} <= {
            optuna.trial.TrialState.COMPLETE,
            optuna.trial.TrialState.PRUNED,
        }, [t.state for t in ran]
        finished = [t.number for t in ran if t.state == optuna.trial.TrialState.COMPLETE]
        assert sorted(finished) == sorted(objectives)
        for t in ran:
            steps = sorted(t.intermediate_values)
            assert steps == list(range(len(steps))) and steps, (t.number, steps)
            assert t.trial_id is not None
            assert_each_point_stored_once(own_postgres.url, t.trial_id, len(steps))


def test_kill_9_in_an_ask_loop_then_a_restart_hands_the_lost_trial_out_again(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    with ServerProcess(url, tmp_path, {"HPO_SCHEDULER": "false"}) as server:
        with server.http() as http:
            sid = http.post(
                "/api/v1/studies", json=simple_spec("k9", lease_s=2.0, max_retries=1)
            ).json()["id"]
            asked = []
            for _ in range(50):
                t = http.post(f"/api/v1/studies/{sid}/ask").json()
                asked.append(t)
                http.post(f"/api/v1/trials/{t['trial_id']}/tell", json={"value": 1.0})
            lost = http.post(f"/api/v1/studies/{sid}/ask").json()  # asked, never told
        server.kill()
        server.start()
        time.sleep(2.5)
        with server.http() as http:
            again = http.post(f"/api/v1/studies/{sid}/ask").json()
            assert (again["trial_id"], again["attempt"]) == (lost["trial_id"], 2), again
            stale = http.post(
                f"/api/v1/trials/{lost['trial_id']}/tell", json={"value": 5.0, "attempt": 1}
            )
            assert stale.status_code == 409, stale.text
            live = http.post(
                f"/api/v1/trials/{again['trial_id']}/tell", json={"value": 2.0, "attempt": 2}
            )
            assert live.status_code == 200 and live.json()["value"] == 2.0
            trials = http.get(f"/api/v1/studies/{sid}/trials").json()["trials"]
            assert sorted(t["number"] for t in trials) == list(range(51))


def test_a_keyed_ask_that_promoted_answers_the_same_attempt_after_a_kill_9(
    tmp_path: Path,
) -> None:
    """A client's ask (Idempotency-Key K) promotes a paused trial; the server is killed -9
    before the client read the answer, and the client sends K again to the restarted server:
    it gets that trial's attempt again (no new trial, no second promotion, nothing spent),
    and the paused attempt's stale writes are refused."""
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    pruner = {"type": "asha", "mode": "promotion", "min_steps": 1, "reduction_factor": 2}
    spec = simple_spec("k9-promote", pruner={**pruner, "max_steps": 8}, lease_s=600)
    with ServerProcess(url, tmp_path, {"HPO_SCHEDULER": "false"}) as server:
        with server.http() as http:
            sid = http.post("/api/v1/studies", json=spec).json()["id"]
            asked = [http.post(f"/api/v1/studies/{sid}/ask").json() for _ in range(2)]
            for t, loss in zip(asked, (0.1, 0.9), strict=True):
                r = http.post(
                    f"/api/v1/trials/{t['trial_id']}/metrics",
                    json={"points": [{"step": 1, "name": "loss", "value": loss}]},
                    headers={"Authorization": f"Bearer {t['attempt_token']}"},
                )
                assert r.json()["should_stop"] is True  # paused at rung 0
            key = {"Idempotency-Key": "K"}
            first = http.post(f"/api/v1/studies/{sid}/ask", headers=key).json()
        assert (first["trial_id"], first["attempt"]) == (asked[0]["trial_id"], 2)
        server.kill()
        server.start()
        with server.http() as http:
            again = http.post(f"/api/v1/studies/{sid}/ask", headers=key)
            assert again.status_code == 201, again.text
            assert (again.json()["trial_id"], again.json()["attempt"]) == (first["trial_id"], 2)
            stale = http.post(
                f"/api/v1/trials/{first['trial_id']}/tell",
                json={"value": 5.0},
                headers={"Authorization": f"Bearer {asked[0]['attempt_token']}"},
            )
            assert stale.status_code == 409, stale.text
            study = http.get(f"/api/v1/studies/{sid}").json()
            assert study["n_trials"] == 2  # no trial made by the replay
            assert study["counts"]["running"] == 1 and study["counts"]["paused"] == 1
            trial = http.get(f"/api/v1/trials/{first['trial_id']}").json()
            assert trial["attempts"] == 2 and trial["state"] == "running"
