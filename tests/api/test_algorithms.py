"""The Optuna-backed samplers (cmaes, nsga2, qmc), constraints and the new pruners over HTTP."""

from __future__ import annotations

from tests.api.test_rest import API, ask, create, get_study, get_trial, report, tell
from tests.conftest import ServerProcess, simple_spec


def loss(params: dict) -> float:
    return (params["x"] - 1) ** 2 + params["n"]


def test_new_samplers_constraints_and_pruners_over_http(sqlite_server: ServerProcess) -> None:
    """One server for all: each new sampler asks and tells, CMA-ES's state comes back from
    the stored suggestions, a constrained study's best is feasible, a threshold stops."""
    with sqlite_server.http() as http:
        ids = {}
        for kind in ("cmaes", "nsga2", "qmc"):
            sampler = {"type": kind, "seed": 1, "n_startup_trials": 2, "population_size": 2}
            ids[kind] = create(http, kind, sampler=sampler)["id"]
        for _ in range(5):
            for sid in ids.values():
                trial = ask(http, sid)
                assert tell(http, trial["trial_id"], value=loss(trial["params"])).status_code == 200
        generations = []
        for _ in range(4):
            trial = ask(http, ids["cmaes"])
            generations.append(get_trial(http, trial["trial_id"])["suggestion"]["generation"])
            tell(http, trial["trial_id"], value=loss(trial["params"]))
        # CMA-ES went on from generation 1: its state came back from the stored suggestions.
        assert generations[0] >= 1 and generations[-1] > generations[0]
        qmc = get_trial(http, ask(http, ids["qmc"])["trial_id"])["suggestion"]
        assert qmc["index"] == 4  # trial 5 takes point 4 of the sequence
        assert get_study(http, ids["nsga2"])["best_trial"] is not None
        r = http.post(f"{API}/studies", json={**simple_spec("bad"), "constraints": ["lat < 1"]})
        assert r.status_code == 422 and "constraints[0]" in r.text
        r = http.post(
            f"{API}/studies", json={**simple_spec("bad"), "pruner": {"type": "threshold"}}
        )
        assert r.status_code == 422 and "lower" in r.text
        spec = {**simple_spec("c"), "constraints": ["lat <= 1"]}
        spec["pruner"] = {"type": "threshold", "upper": 10.0}
        r = http.post(f"{API}/studies", json=spec)
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        assert r.json()["spec"]["constraints"] == ["lat <= 1"]
        fast, slow = ask(http, sid), ask(http, sid)
        assert report(http, fast["trial_id"], 1, 0.5, name="lat") is False
        assert report(http, slow["trial_id"], 1, 3.0, name="lat") is False
        tell(http, fast["trial_id"], value=5.0)
        tell(http, slow["trial_id"], value=1.0)  # better, but infeasible
        assert get_study(http, sid)["best_trial"]["id"] == fast["trial_id"]
        diverged = ask(http, sid)["trial_id"]
        assert report(http, diverged, 1, 11.0) is True
        assert get_trial(http, diverged)["pruned"]["bound"] == "upper"
