"""Continuing and warm-starting studies over a served control plane (SQLite and PostgreSQL):
a raised budget reopens a completed study, ``load_if_exists`` refuses a different study,
queued and imported trials, asks with given params, user attributes."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hpo.service.errors import BudgetSpent, Conflict, InvalidInput
from tests.conftest import ServerProcess, simple_spec

ROOT = Path(__file__).resolve().parents[2]


def _run(study, n: int) -> None:
    study.optimize(lambda t: (t.params["x"] - 1) ** 2, n_trials=n)


def test_continue_and_warm_start(server: ServerProcess, tmp_path: Path) -> None:
    """One served control plane per database for both checks (a server takes ~10 s to start)."""
    check_a_completed_study_continues_and_load_if_exists_checks_the_study(server)
    check_ask_with_params_enqueue_import_and_user_attrs(server, tmp_path)


def check_a_completed_study_continues_and_load_if_exists_checks_the_study(
    server: ServerProcess,
) -> None:
    with server.client() as client:
        spec = simple_spec("cont", budget={"max_trials": 3})
        study = client.create_study(spec)
        _run(study, None)
        assert study.state == "completed" and study.record.n_trials == 3
        with pytest.raises(BudgetSpent):
            study.ask()

        # Raising the budget of a completed study runs it again (was a 409).
        record = study.continue_(2)
        assert record.state == "running" and record.spec["budget"]["max_trials"] == 5
        _run(study, None)
        assert study.state == "completed" and study.record.counts["complete"] == 5

        # load_if_exists: the same study, and optimize(n_trials) runs that many more.
        again = client.create_study(spec, load_if_exists=True)
        assert again.id == study.id
        again.optimize(lambda t: t.params["x"] ** 2, n_trials=4)
        assert again.record.counts["complete"] == 9 and again.state == "completed"

        # ... but not a study with another objective or space: 409 naming the difference.
        other = simple_spec("cont", objective={"metric": "loss", "direction": "maximize"})
        with pytest.raises(Conflict, match="objective") as err:
            client.create_study(other, load_if_exists=True)
        assert err.value.field == "objective"
        wider = simple_spec("cont")
        wider["space"]["x"] = {"type": "float", "low": -9.0, "high": 5.0}
        with pytest.raises(Conflict, match=r"space\.x") as err:
            client.create_study(wider, load_if_exists=True)
        assert err.value.field == "space.x"
        # true is not 1: a domain of booleans is another domain than one of 0 and 1
        numbers = simple_spec("cont-bool", space={"c": {"type": "categorical", "choices": [1, 0]}})
        client.create_study(numbers)
        flags = simple_spec(
            "cont-bool", space={"c": {"type": "categorical", "choices": [True, False]}}
        )
        with pytest.raises(Conflict, match=r"space\.c") as err:
            client.create_study(flags, load_if_exists=True)
        assert err.value.field == "space.c"

    with server.http() as http:
        body = simple_spec("cont", budget={"max_trials": 3})
        answer = http.post("/api/v1/studies", params={"load_if_exists": "true"}, json=body)
        assert answer.status_code == 200 and answer.json()["id"] == study.id
        fresh = simple_spec("cont-new")
        answer = http.post("/api/v1/studies", params={"load_if_exists": "true"}, json=fresh)
        assert answer.status_code == 201


def check_ask_with_params_enqueue_import_and_user_attrs(
    server: ServerProcess, tmp_path: Path
) -> None:
    with server.client() as client, server.http() as http:
        spec = simple_spec("warm", budget={"max_trials": 4})
        spec["space"]["kind"] = {"type": "categorical", "choices": ["a", "b"]}
        spec["space"]["depth"] = {"type": "int", "low": 1, "high": 3, "when": {"kind": ["b"]}}
        study = client.create_study(spec)

        # Ask with given params: kept, the rest sampled; inactive ones dropped.
        t = study.ask(params={"x": 1.5, "kind": "a"})
        assert t.params["x"] == 1.5 and t.params["kind"] == "a" and "depth" not in t.params
        study.tell(t, value=0.25)
        sid = study.id
        for bad, field in (({"x": 9.0}, "params.x"), ({"nope": 1}, "params.nope")):
            answer = http.post(f"/api/v1/studies/{sid}/ask", json={"params": bad})
            assert answer.status_code == 422 and answer.json()["field"] == field, answer.text
        with pytest.raises(InvalidInput, match="params.depth"):
            study.ask(params={"kind": "b", "x": 0.0, "depth": 7})

        # Enqueued trials come first, in order, with exactly their params.
        q1 = study.enqueue_trial({"x": 0.5, "n": 2, "kind": "b", "depth": 3})
        q2 = study.enqueue_trial({"x": -0.5, "n": 1, "kind": "a"})
        assert q1.state == "waiting"
        with pytest.raises(InvalidInput, match="params.depth"):
            study.enqueue_trial({"x": 0.5, "n": 2, "kind": "b"})  # depth is active: missing
        first, second = study.ask(), study.ask()
        assert (first.trial_id, second.trial_id) == (q1.id, q2.id)
        assert first.params == {"x": 0.5, "n": 2, "kind": "b", "depth": 3}
        study.tell(first, value=0.2)
        study.tell(second, value=2.25)

        # User attrs: set (merged), read back on the record and in the DataFrame.
        study.set_user_attr(first, "note", "from the queue")
        record = study.set_user_attr(first.trial_id, "epochs", 3)
        assert record.user_attrs == {"note": "from the queue", "epochs": 3}
        frame = study.trials_dataframe().set_index("number")
        assert frame.loc[first.number, "user_attrs_note"] == "from the queue"

        # Import: another study's finished trials warm-start a new one; no budget spent.
        target = client.create_study({**spec, "name": "warm-target", "budget": {"max_trials": 2}})
        imported = target.add_trials(study)
        assert len(imported) == 3 and {t.state for t in imported} == {"complete"}
        assert {"note": "from the queue", "epochs": 3} in [t.user_attrs for t in imported]
        target_record = target.record
        assert target_record.best_trial.value == 0.2
        assert target_record.spec["budget"]["max_trials"] == 5  # 2 + the 3 imported
        bad = {"trials": [{"params": {"x": 99.0, "n": 1, "kind": "a"}, "value": 1.0}]}
        answer = http.post(f"/api/v1/studies/{target.id}/trials", json=bad)
        assert answer.status_code == 422 and answer.json()["field"] == "trials[0].params.x"

        # From an Optuna storage: TPE counts them and is past its random start-up at once.
        url = f"sqlite:///{tmp_path / 'optuna.db'}"
        old = optuna.create_study(storage=url, study_name="old")
        dists = {"x": optuna.distributions.FloatDistribution(-5, 5)}
        for x in (0.5, 1.5, 3.0):
            old.add_trial(
                optuna.trial.create_trial(params={"x": x}, distributions=dists, value=x * x)
            )
        states = optuna.trial.TrialState
        for x, state in ((4.0, states.PRUNED), (4.5, states.FAIL), (2.0, states.RUNNING)):
            attrs = {"why": state.name}
            old.add_trial(
                optuna.trial.create_trial(
                    params={"x": x}, distributions=dists, state=state, user_attrs=attrs
                )
            )
        tpe = {"type": "tpe", "seed": 0, "n_startup_trials": 2}
        space = {"x": {"type": "float", "low": -5.0, "high": 5.0}}
        warm = client.create_study(simple_spec("from-optuna", sampler=tpe, space=space))
        added = warm.add_trials(url, study_name="old")  # the finished ones: not the running
        assert [(t.state, t.value, t.params["x"]) for t in added] == [
            ("complete", 0.25, 0.5),
            ("complete", 2.25, 1.5),
            ("complete", 9.0, 3.0),
            ("pruned", None, 4.0),
            ("failed", None, 4.5),
        ]
        assert [t.user_attrs for t in added[3:]] == [{"why": "PRUNED"}, {"why": "FAIL"}]
        asked = warm.ask()
        why = client.trial(asked.trial_id).suggestion
        # the complete and the pruned ones, as Optuna's TPE learns from them; not the failed
        assert why["n_observations"] == 4 and why["startup"] is False

        # Enqueue on a completed study reopens it for that trial.
        _run_all(target)
        assert target.state == "completed"
        queued = target.enqueue_trial({"x": 1.0, "n": 1, "kind": "a"})
        assert target.state == "running"
        assert target.ask().trial_id == queued.id


def _run_all(study) -> None:
    study.optimize(lambda t: (t.params["x"] - 1) ** 2)


def readme_notebook() -> str:
    """The README's notebook block (the first Python block after "## Notebooks")."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Notebooks") :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_notebook_runs_twice_and_report_takes_both_orders(
    sqlite_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPO_TOKEN", sqlite_server.token)
    code = readme_notebook().replace("http://127.0.0.1:8000", sqlite_server.url)
    for run in (1, 2):  # the second run continues the same study (it was NameTaken)
        exec(compile(code, "README.md", "exec"), {})
        with sqlite_server.client() as client:
            record = client.study("svm-digits").record
            assert record.n_trials == 11 * run and record.state == "running"
            assert record.spec["budget"]["max_trials"] == 11 * run + 5

    with sqlite_server.client() as client:
        study = client.create_study(simple_spec("orders"))
        seen: list[int] = []

        def objective(trial) -> float:
            trial.report(0, {"loss": 3.0})  # ours: (step, metrics)
            trial.report(2.0, 1)  # Optuna's: (value, step)
            with pytest.raises(TypeError, match="Optuna"):
                trial.report("fast", 2)
            with pytest.raises(TypeError, match="Optuna"):  # one argument: the forms are said
                trial.report(0.5)
            seen.append(trial.number)
            return 1.0

        study.optimize(objective, n_trials=1)
        assert seen == [0]
        points = study.metrics(study.trials()[0].id, "loss")
        assert [(p.step, p.value) for p in points] == [(0, 3.0), (1, 2.0)]
        with pytest.raises(TypeError, match="name: value"):
            study.report(study.ask(), 2.0, 3)  # type: ignore[arg-type]
