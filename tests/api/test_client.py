"""The notebook flow: ``hpo.api.client.Client`` against a served control plane (SQLite and
PostgreSQL), with typed errors for the server's answers."""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pydantic import ValidationError

from hpo.api.client import Client, TrialHandle, Unauthorized
from hpo.service.errors import (
    BudgetSpent,
    ConcurrencyLimit,
    GridExhausted,
    InvalidInput,
    NameTaken,
    NotFound,
    StudyNotRunning,
    TrialFinished,
)
from tests.conftest import ServerProcess, simple_spec


def names(client: Client) -> list[str]:
    return sorted(s.name for s in client.studies())


def test_ask_report_tell_best_and_dataframes(server: ServerProcess) -> None:
    with server.client() as client:
        study = client.create_study(simple_spec("nb"))
        assert study.id > 0 and study.name == "nb" and study.state == "running"

        values = {}
        for i in range(3):
            t = study.ask()
            assert t.number == i and set(t.params) == {"x", "n"}
            for step in range(2):
                should_stop = study.report(
                    t, step=step, metrics={"loss": (t.params["x"] - 1) ** 2 + 1 / (step + 1)}
                )
                assert should_stop is False
            value = (t.params["x"] - 1) ** 2
            record = study.tell(t, value=value)
            assert record.state == "complete" and record.value == value
            values[t.trial_id] = value
        failed = study.ask()
        study.tell(failed, state="failed", error="diverged")
        running = study.ask()

        best = study.best_trial
        best_id = min(values, key=values.get)
        assert best is not None and best.id == best_id and best.value == values[best_id]
        assert study.best_params == best.params
        assert [t.id for t in study.best_trials] == [best_id]
        assert study.record.counts == {
            "waiting": 0,
            "running": 1,
            "paused": 0,
            "complete": 3,
            "pruned": 0,
            "failed": 1,
        }

        trials = study.trials()
        assert [t.number for t in trials] == [0, 1, 2, 3, 4]
        assert [t.id for t in study.trials(state="complete")] == list(values)

        df = study.trials_dataframe()
        assert isinstance(df, pd.DataFrame)
        assert len(df) == 5
        assert list(df.columns[:4]) == ["number", "trial_id", "state", "value"]
        assert {"params_x", "params_n", "attempts", "duration_s", "error"} <= set(df.columns)
        assert list(df["number"]) == [0, 1, 2, 3, 4]
        assert list(df["state"]) == ["complete"] * 3 + ["failed", "running"]
        assert df.loc[df["trial_id"] == best_id, "value"].item() == best.value
        assert df["value"].iloc[3:].isna().all()
        assert df.loc[3, "error"] == "diverged"
        assert list(df["params_x"]) == [t.params["x"] for t in trials]
        assert isinstance(df["started_at"].dtype, pd.DatetimeTZDtype)

        metrics = study.metrics_dataframe()
        assert list(metrics.columns) == ["number", "trial_id", "step", "name", "value", "time"]
        assert len(metrics) == 6
        assert sorted(set(metrics["number"])) == [0, 1, 2]
        assert list(metrics.loc[metrics["trial_id"] == best_id, "step"]) == [0, 1]
        assert study.metrics_dataframe(name="nope").empty

        changed, cursor = study.changed_trials(None)
        assert len(changed) == 5
        study.tell(running, value=0.0)
        changed, _ = study.changed_trials(cursor)
        assert [t.id for t in changed] == [running.trial_id]
        assert study.best_trial.id == running.trial_id

        assert "params_x" in study.export_csv().splitlines()[0]
        # a JSON user attribute is a JSON cell of the CSV (it was Python's repr)
        attr = {"layers": [1, 2], "ok": True, "s": "a,b\nc"}
        study.set_user_attr(running, "config", attr)
        rows = list(csv.DictReader(io.StringIO(study.export_csv())))
        assert json.loads(rows[4]["user_attrs_config"]) == attr


def test_create_from_yaml_lookup_control_and_typed_errors(
    server: ServerProcess, tmp_path: Path, subtests: pytest.Subtests
) -> None:
    with subtests.test("create from YAML, look up, control, delete"):
        check_create_from_yaml_lookup_and_control(server, tmp_path)
    with subtests.test("typed errors"):
        check_typed_errors(server)


def check_create_from_yaml_lookup_and_control(server: ServerProcess, tmp_path: Path) -> None:
    spec_file = tmp_path / "study.yaml"
    spec_file.write_text(yaml.safe_dump(simple_spec("from-yaml", budget={"max_trials": 4})))
    with server.client() as client:
        from_path = client.create_study(spec_file)
        assert from_path.record.spec["budget"]["max_trials"] == 4

        again = client.create_study(str(spec_file), load_if_exists=True)
        assert again.id == from_path.id
        with pytest.raises(NameTaken) as taken:
            client.create_study(spec_file)
        assert taken.value.field == "name" and taken.value.status_code == 409

        text = client.create_study(yaml.safe_dump(simple_spec("from-text")))
        assert names(client) == ["from-text", "from-yaml"]

        by_name = client.study("from-yaml")
        by_id = client.study(from_path.id)
        assert by_name.id == by_id.id == from_path.id
        assert client.study(str(text.id)).name == "from-text"

        t = by_name.ask()
        assert by_name.pause().state == "paused"
        with pytest.raises(StudyNotRunning, match="paused"):
            by_name.ask()
        assert by_name.report(t, step=0, metrics={"loss": 1.0}) is False
        with pytest.raises(InvalidInput, match="metrics.loss: must be a finite") as refused:
            by_name.report(t, step=1, metrics={"loss": math.inf})
        assert refused.value.field == "metrics.loss"
        assert by_name.resume().state == "running"
        assert by_name.ask().number == 1
        stopped = by_name.stop()
        assert stopped.state == "stopped" and stopped.counts["failed"] == 2
        assert by_name.report(t, step=1, metrics={"loss": 1.0}) is True
        with pytest.raises(StudyNotRunning):
            by_name.resume()
        assert client.studies(state="stopped")[0].id == from_path.id
        assert [s.name for s in client.studies(state="running")] == ["from-text"]

        by_name.delete()
        with pytest.raises(NotFound):
            client.study(from_path.id)
        with pytest.raises(NotFound):
            client.study("from-yaml")
        with pytest.raises(NotFound):
            client.trial(t.trial_id)
        assert names(client) == ["from-text"]


def test_optimize(server: ServerProcess, subtests: pytest.Subtests) -> None:
    with subtests.test("logistic regression on digits"):
        check_optimize_logistic_regression_on_digits(server)
    with subtests.test("failures and pruning"):
        check_optimize_tells_failures_and_prunes(server)
    with subtests.test("a study out of time ends the run"):
        check_optimize_ends_quietly_on_a_study_out_of_time(server)


def check_optimize_ends_quietly_on_a_study_out_of_time(server: ServerProcess) -> None:
    with server.client() as client:
        study = client.create_study(
            simple_spec("out-of-time", budget={"max_trials": 1, "timeout_s": 0.5})
        )
        study.optimize(lambda trial: trial.params["x"] ** 2, n_trials=1)
        time.sleep(0.7)
        # its max_trials is spent and its time has passed: raising max_trials is refused
        # (409), which ends the run as an out-of-time study does, with nothing asked
        study.optimize(lambda trial: trial.params["x"] ** 2, n_trials=2)
        assert [t.number for t in study.trials()] == [0]
        assert study.state == "completed"


def check_optimize_logistic_regression_on_digits(server: ServerProcess) -> None:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0)
    seen: list[tuple[float, float]] = []

    def objective(trial: TrialHandle) -> float:
        C = trial.params["C"]
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=500))
        model.fit(X_train, y_train)
        accuracy = float(model.score(X_test, y_test))
        trial.report(0, {"accuracy": accuracy})
        # the study's own report takes the handle too, with its attempt's token
        assert not study.report(trial, 1, {"accuracy": accuracy})
        seen.append((C, accuracy))
        return accuracy

    spec = {
        "name": "digits",
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "sampler": {"type": "random", "seed": 1},
        "space": {"C": {"type": "float", "low": 1e-4, "high": 10.0, "log": True}},
        "budget": {"max_trials": 5},
    }
    with server.client() as client:
        study = client.create_study(spec)
        study.optimize(objective, n_trials=4)
        trials = study.trials()
        assert [t.state for t in trials] == ["complete"] * 4
        assert [(t.params["C"], t.value) for t in trials] == seen
        assert all(1e-4 <= c <= 10.0 for c, _ in seen)
        best = study.best_trial
        assert best.value == max(a for _, a in seen)
        assert best.value > 0.9  # well-regularised logistic regression on digits
        assert study.metrics(best)[0].value == best.value

        # without n_trials it runs until the budget is spent, then returns
        study.optimize(objective)
        assert len(study.trials()) == 5
        assert study.state == "completed"
        study.optimize(objective)  # nothing left: returns at once
        assert len(seen) == 5


def check_optimize_tells_failures_and_prunes(server: ServerProcess) -> None:
    with server.client() as client:
        study = client.create_study(
            simple_spec("opt", pruner={"type": "asha", "min_steps": 1, "reduction_factor": 2})
        )

        def objective(trial: TrialHandle) -> float:
            if trial.number == 1:
                raise RuntimeError("diverged")
            for step in range(1, 4):
                loss = 0.1 * step if trial.number == 0 else 10.0 * step
                if trial.report(step, {"loss": loss}):
                    return loss
            return loss

        study.optimize(objective, n_trials=3, catch=(RuntimeError,))
        states = [(t.number, t.state) for t in study.trials()]
        assert states == [(0, "complete"), (1, "failed"), (2, "pruned")]
        failed = study.trials(state="failed")[0]
        assert failed.error == "RuntimeError: diverged"

        def broken(trial: TrialHandle) -> float:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):  # not in `catch`: told failed, re-raised
            study.optimize(broken, n_trials=1)
        last = study.trials()[-1]
        assert last.state == "failed" and last.error == "ValueError: boom"


def check_typed_errors(server: ServerProcess) -> None:
    with server.client() as client:
        budget = client.create_study(simple_spec("budget", budget={"max_trials": 1}))
        t = budget.ask()
        with pytest.raises(BudgetSpent) as spent:
            budget.ask()
        assert type(spent.value) is BudgetSpent
        assert spent.value.status_code == 409 and spent.value.field == "budget.max_trials"

        grid = client.create_study(
            simple_spec(
                "grid",
                sampler={"type": "grid"},
                space={"c": {"type": "categorical", "choices": ["only"]}},
            )
        )
        g = grid.ask()
        assert g.params == {"c": "only"}
        grid.tell(g, value=1.0)
        with pytest.raises(GridExhausted, match="exhausted"):
            grid.ask()
        assert grid.state == "completed"

        with pytest.raises(NotFound):
            client.study(987654)
        with pytest.raises(NotFound):
            client.study("no-such-study")
        with pytest.raises(NotFound):
            client.trial(987654)
        with pytest.raises(NotFound) as missing:
            budget.tell(987654, value=1.0)
        assert missing.value.status_code == 404 and missing.value.field == "trial_id"

        with pytest.raises(InvalidInput) as invalid:
            budget.tell(t)  # a complete trial needs a value
        assert invalid.value.status_code == 422 and invalid.value.field == "value"
        with pytest.raises(InvalidInput) as invalid:
            budget.tell(t, values=[1.0, 2.0])
        assert invalid.value.field == "values"
        with pytest.raises(InvalidInput) as invalid:
            budget.set_budget(max_trials=0)
        assert invalid.value.field == "budget.max_trials"
        assert client.trial(t.trial_id).state == "running"

        budget.tell(t, value=0.5)
        budget.tell(t, value=0.5)  # the same tell again is fine
        with pytest.raises(TrialFinished, match="already finished") as finished:
            budget.tell(t, value=0.6)
        assert finished.value.status_code == 409
        assert client.trial(t.trial_id).value == 0.5

        conc = client.create_study(simple_spec("conc", budget={"max_concurrent": 1}))
        conc.ask()
        with pytest.raises(ConcurrencyLimit):
            conc.ask()

        before = [s.id for s in client.studies()]
        with pytest.raises(InvalidInput) as bad:  # checked locally, before any request
            client.create_study(simple_spec("bad", space={"lr": {"type": "float", "low": 2}}))
        assert bad.value.field == "space.lr" and "`high` is required" in str(bad.value)
        with pytest.raises(InvalidInput) as bad:  # was pydantic's ValidationError, untyped
            client.create_study(
                simple_spec("bad", space={"lr": {"type": "float", "low": 1.0, "high": 0.1}})
            )
        assert bad.value.field == "space.lr" and "greater than `high`" in str(bad.value)
        assert isinstance(bad.value.__cause__, ValidationError)
        assert [s.id for s in client.studies()] == before

    with server.client(token="wrong") as intruder:
        with pytest.raises(Unauthorized) as denied:
            intruder.studies()
        assert denied.value.status_code == 401


def test_a_study_named_with_digits_is_found_by_name(sqlite_server: ServerProcess) -> None:
    with sqlite_server.client() as client:
        try:
            study = client.create_study(simple_spec("2024"))
        except (InvalidInput, ValidationError):
            return  # refusing such names up front would be a fix too
        assert study.id != 2024  # no id to confuse it with
        assert client.study("2024").id == study.id


def test_a_token_with_surrounding_whitespace_works_and_one_a_header_cannot_carry_is_named(
    sqlite_server: ServerProcess,
) -> None:
    # a token pasted with a newline or spaces (the server strips its own the same way)
    with Client(sqlite_server.url, token=f" {sqlite_server.token}\n") as client:
        assert isinstance(client.studies(), list)
    with pytest.raises(ValueError, match="characters an HTTP header cannot carry"):
        Client(sqlite_server.url, token="tøken")


def test_what_a_notebook_user_found_surprising(sqlite_server: ServerProcess) -> None:
    """Rough edges a probe of the client as an Optuna user found (each failed before)."""
    with sqlite_server.client() as client:
        # continue_(n) never lowers a budget that already allows more
        study = client.create_study(simple_spec("roomy", budget={"max_trials": 50}))
        study.tell(study.ask(), value=1.0)
        assert study.continue_(5).spec["budget"]["max_trials"] == 50
        small = client.create_study(simple_spec("small", budget={"max_trials": 1}))
        small.tell(small.ask(), value=1.0)
        assert small.state == "completed"
        assert small.continue_(5).spec["budget"]["max_trials"] == 6

        # loading a study by a spec whose budget or sampler differ says what it kept
        changed = simple_spec("roomy", budget={"max_trials": 10}, sampler={"type": "tpe"})
        with pytest.warns(UserWarning, match="keeps its stored sampler, budget"):
            assert client.create_study(changed, load_if_exists=True).id == study.id
        study.set_study_user_attrs({"dataset": "digits"})  # set as the study runs
        with warnings.catch_warnings():  # the same spec again: nothing to say
            warnings.simplefilter("error")
            same = simple_spec("roomy", budget={"max_trials": 50})
            assert client.create_study(same, load_if_exists=True).id == study.id
        other = simple_spec("roomy", budget={"max_trials": 50}, user_attrs={"dataset": "wine"})
        with pytest.warns(UserWarning, match="keeps its stored user_attrs"):
            client.create_study(other, load_if_exists=True)

        # a multi-objective study has no single best trial: said, not None
        two = simple_spec(
            "two",
            objective=[
                {"metric": "loss", "direction": "minimize"},
                {"metric": "size", "direction": "minimize"},
            ],
        )
        pareto = client.create_study(two)
        pareto.tell(pareto.ask(), values=[1.0, 2.0])
        with pytest.raises(ValueError, match="best_trials, not best_trial"):
            _ = pareto.best_trial
        assert len(pareto.best_trials) == 1

        # NaN where JSON cannot carry it: an error naming where, and nothing sent
        with pytest.raises(InvalidInput, match=r"trials\[1\]\.value: must be a finite") as err:
            study.add_trials(
                [
                    {"params": {"x": 0.1, "n": 1}, "value": 1.0},
                    {"params": {"x": 0.2, "n": 1}, "value": float("nan")},
                ]
            )
        assert err.value.field == "trials[1].value"
        with pytest.raises(InvalidInput, match=r"body\.x: must be a finite") as err:
            client.request("POST", "/api/v1/studies", json={"body": {"x": float("inf")}})
        assert len(study.trials()) == 1
        asked = study.ask()
        with pytest.raises(InvalidInput, match="must be a finite number, got nan"):
            study.set_user_attr(asked, "score", float("nan"))

        # the frame's numbers are numbers while no trial has one yet (not object columns)
        fresh = client.create_study(simple_spec("fresh"))
        fresh.ask()
        frame = fresh.trials_dataframe()
        assert {str(frame[c].dtype) for c in ("value", "last_step", "duration_s")} == {"float64"}


def test_numpy_numbers_whole_second_times_and_an_empty_frame(
    sqlite_server: ServerProcess,
) -> None:
    """What a notebook hands over: numpy's numbers were a TypeError from the JSON encoder
    (Optuna takes them), a trial time on a whole second made ``trials_dataframe`` fail for
    good (pandas took the format from the first row), and an empty study's frame had
    integer value columns."""
    import numpy as np
    import sqlalchemy

    with sqlite_server.client() as client:
        study = client.create_study(simple_spec("np"))
        empty = study.trials_dataframe()
        assert empty.empty and empty["value"].dtype == "float64"
        assert empty["duration_s"].dtype == "float64" and empty["number"].dtype == "int64"

        t = study.ask()
        assert study.report(t, np.int64(1), {"loss": np.float32(0.5)}) is False
        assert study.tell(t, np.float32(0.25)).value == 0.25
        bad = study.ask()
        with pytest.warns(UserWarning, match="not finite"):  # the NaN rule, numpy's NaN too
            assert study.tell(bad, np.float32("nan")).state == "failed"
        study.optimize(lambda trial: float(trial.report(0.5, np.arange(3)[1]) or 0.1), n_trials=1)
        study.enqueue_trial({"x": np.float64(1.0), "n": np.int64(2)})
        queued = study.ask()
        assert queued.params == {"x": 1.0, "n": 2}
        study.tell(queued, np.array(0.75))
        assert client.trial(queued.trial_id).value == 0.75

        engine = sqlalchemy.create_engine(sqlite_server.database_url)
        with engine.begin() as conn:  # a clock that stopped on a whole second
            conn.execute(
                sqlalchemy.text("UPDATE trials SET finished_at = :at WHERE id = :id"),
                {"at": "2026-12-05 19:30:10.000000", "id": t.trial_id},
            )
        engine.dispose()
        study.set_user_attr(t, "touched", np.int64(1))  # the server reads the trial again
        frame = study.trials_dataframe()
        assert len(frame) == 4 and frame["number"].dtype == "int64"
        whole = frame.loc[frame["trial_id"] == t.trial_id, "finished_at"].item()
        assert whole == pd.Timestamp("2026-12-05T19:30:10", tz="UTC")
        assert frame["finished_at"].notna().all()
        rows = list(csv.DictReader(io.StringIO(study.export_csv())))  # one form in every row
        assert {len(r["finished_at"]) for r in rows} == {len("2026-12-05T19:30:10.000000+00:00")}


def test_control_calls_wait_out_a_busy_database_as_tell_does(
    sqlite_server: ServerProcess, tmp_path: Path
) -> None:
    """Another process held SQLite's write lock for seconds: ``tell`` waited it out, but
    ``pause``, ``set_budget`` and ``stop`` failed on the first 503 (they were not resent,
    though each sets an absolute value). Each now lands once the lock is let go."""
    import sqlite3
    import threading

    with sqlite_server.client() as client:
        study = client.create_study(simple_spec("busy"))
        calls = {
            "pause": lambda: study.pause().state,
            "set_budget": lambda: study.set_budget(max_trials=7).spec["budget"]["max_trials"],
            "resume": lambda: study.resume().state,
            "stop": lambda: study.stop().state,
        }
        for what, call in calls.items():
            holder = sqlite3.connect(tmp_path / "hpo.db", timeout=10, check_same_thread=False)
            holder.execute("BEGIN EXCLUSIVE")  # what a long write of another process holds
            let_go = threading.Timer(4.0, holder.rollback)
            let_go.start()
            try:
                started = time.monotonic()
                answer = call()
                assert time.monotonic() - started >= 3.5, what  # it did wait for the lock
            finally:
                let_go.join()
                holder.close()
            expected = {"pause": "paused", "set_budget": 7, "resume": "running"}
            assert answer == expected.get(what, "stopped"), what


def test_a_large_import_is_sent_in_pieces_under_the_body_limit_and_names_its_bad_row(
    sqlite_server: ServerProcess,
) -> None:
    """``add_trials`` sent 1,000 rows a request whatever their size (rows with 9 KB of notes
    each passed the 8 MiB body limit: a 413 for rows all valid), and a bad row past the first
    request was named by its place in that request (trials[500] for row 1,500), with nothing
    saying that the rows before it had been imported."""
    with sqlite_server.client() as client:
        study = client.create_study(simple_spec("imports"))
        notes = {"note": "n" * 9000}
        rows = [
            {"params": {"x": 0.0, "n": 1}, "value": float(i), "user_attrs": notes}
            for i in range(1000)
        ]
        assert len(study.add_trials(rows)) == 1000  # 9 MB of JSON in all
        bad = [{"params": {"x": 0.0, "n": 1}, "value": 1.0} for _ in range(1600)]
        bad[1500]["params"] = {"x": 5.5, "n": 1}
        with pytest.raises(InvalidInput) as refused:
            study.add_trials(bad)
        assert refused.value.field == "trials[1500].params.x"
        assert "trials[0:1000] were imported" in str(refused.value)
        assert study.refresh().n_trials == 2000
