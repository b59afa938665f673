"""``hpo.optuna``: Optuna's API on a served control plane (SQLite and PostgreSQL), with the
space learned at run time (define-by-run) and kept by the server."""

from __future__ import annotations

import datetime
import threading
import time

import numpy as np
import pytest

import hpo.optuna as optuna
from hpo.service.errors import Conflict, InvalidInput, TrialFinished
from tests.conftest import ServerProcess, simple_spec, wait_for


def objective(trial: optuna.Trial) -> float:
    kind = trial.suggest_categorical("kind", ["quad", "abs"])
    x = trial.suggest_float("x", -4.0, 4.0)
    assert trial.suggest_float("x", -4.0, 4.0) == x  # asking again answers the same value
    if kind == "quad":
        n = trial.suggest_int("n", 1, 3)
        value = (x - 1) ** 2 + n
    else:
        value = abs(x) + 2
    for step in range(3):
        trial.report(value + 1 / (step + 1), step)  # Optuna's order
        if trial.should_prune():
            raise optuna.TrialPruned()
    trial.set_user_attr("kind_seen", kind)
    return value


def test_an_optuna_script_runs_on_the_server(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPO_TOKEN", server.token)
    finished: list[int] = []
    lock = threading.Lock()

    def remember(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        with lock:
            finished.append(trial.number)

    study = optuna.create_study(
        storage=server.url,
        study_name="compat",
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2),
    )
    study.enqueue_trial({"kind": "quad", "x": 1.0, "n": 1})
    study.optimize(objective, n_trials=8, n_jobs=2, callbacks=[remember])

    trials = study.trials
    assert len(trials) == 8 and sorted(finished) == list(range(8))
    assert trials[0].params == {"kind": "quad", "x": 1.0, "n": 1}
    for t in trials:  # only what the objective suggested: no `n` on an `abs` trial
        expected = {"kind", "x", "n"} if t.params["kind"] == "quad" else {"kind", "x"}
        assert set(t.params) == expected
    assert study.best_value == 1.0 and study.best_params == {"kind": "quad", "x": 1.0, "n": 1}
    assert study.best_trial.user_attrs == {"kind_seen": "quad"}
    frame = study.trials_dataframe()
    assert {"number", "value", "params_x", "params_n", "user_attrs_kind_seen", "state"} <= set(
        frame.columns
    )
    assert set(frame["state"]) <= {"COMPLETE", "PRUNED"}

    # The server learned the space as the trials named it, and now samples it jointly.
    with server.client() as client:
        hpo_study = client.study("compat")
        space = hpo_study.record.spec["space"]
        assert space["x"] == {"type": "float", "low": -4.0, "high": 4.0}
        assert space["kind"]["choices"] == ["quad", "abs"]
        asked = hpo_study.ask()
        assert asked.params == {}
        proposed = client.trial(asked.trial_id).suggestion["proposed"]
        assert set(proposed) == {"kind", "x", "n"}
        # The same name with another kind of domain is refused, naming it.
        knows = r"x: the study knows it as float \[-4.0, 4.0\]; a trial asked for int \[0, 3\]"
        with pytest.raises(InvalidInput, match=knows):
            hpo_study.suggest(asked, "x", {"type": "int", "low": 0, "high": 3})
        hpo_study.tell(asked, state="failed")

    # load_if_exists: the same study continues; another direction is refused.
    again = optuna.create_study(storage=server.url, study_name="compat", load_if_exists=True)
    again.optimize(objective, n_trials=2)
    assert len(again.trials) == 11
    with pytest.raises(Conflict, match="objective"):
        optuna.create_study(
            storage=server.url, study_name="compat", direction="maximize", load_if_exists=True
        )

    # A grid runs each point once and ends the optimize; a timeout ends one too.
    grid = optuna.create_study(
        storage=server.url, sampler=optuna.samplers.GridSampler({"x": [-1.0, 0.0, 1.0]})
    )

    def squared(t: optuna.Trial) -> float:
        return t.suggest_float("x", -1, 1) ** 2

    grid.optimize(squared, n_trials=10)
    assert sorted(t.params["x"] for t in grid.trials) == [-1.0, 0.0, 1.0]
    assert grid.best_value == 0.0
    # the best trial runs the objective again, though the grid declared x by its values
    assert squared(grid.best_trial) == 0.0


def test_storage_must_be_a_server_url() -> None:
    with pytest.raises(ValueError, match="URL of an hpo server"):
        optuna.create_study(storage="sqlite:///optuna.db")


def test_optuna_habits_tell_by_number_unchecked_reports_stop_and_non_finite_values(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPO_TOKEN", server.token)
    # tell(number) names the trial of *this* study with that number (a trial id of another
    # study with the same value is left alone)
    a = optuna.create_study(storage=server.url, study_name="by-number-a")
    first = a.ask()
    first.suggest_float("x", 0, 1)
    b = optuna.create_study(storage=server.url, study_name="by-number-b")
    asked = [b.ask() for _ in range(first.trial_id + 1)]
    told = b.tell(first.trial_id, 0.123)
    assert told.number == first.trial_id and told.values == [0.123]
    assert [t.state for t in a.trials] == [optuna.trial.TrialState.RUNNING]
    with pytest.raises(ValueError, match="no trial number 999"):
        b.tell(999, 1.0)
    # a number asked through another Study object (another process) is found on the server
    extra = b.ask()
    elsewhere = optuna.load_study(storage=server.url, study_name="by-number-b")
    assert elsewhere.tell(extra.number, 0.5).values == [0.5]
    with pytest.raises(ValueError, match="Cannot tell a finished trial") as finished:
        b.tell(extra, 0.7)
    assert isinstance(finished.value.__cause__, TrialFinished)
    assert b.tell(extra, 0.7, skip_if_finished=True).values == [0.5]
    with pytest.raises(ValueError, match="Values are required"):
        b.tell(asked[0], state=optuna.trial.TrialState.COMPLETE)

    # an objective that reports and never looks at should_prune: the run goes on
    unchecked = optuna.create_study(
        storage=server.url,
        study_name="unchecked",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )

    def reports_only(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0, 1)
        loss = 10.0 if trial.number >= 2 else 1.0
        for step in range(5):
            trial.report(loss + 0.1 * (5 - step), step)
        return loss

    unchecked.optimize(reports_only, n_trials=6)
    assert len(unchecked.trials) == 6

    # stop() from a callback ends the run after that trial; outside optimize it is an error
    stopping = optuna.create_study(storage=server.url, study_name="stopping")
    stopping.optimize(
        lambda t: t.suggest_float("x", 0, 1),
        n_trials=10,
        callbacks=[lambda study, frozen: study.stop() if frozen.number == 2 else None],
    )
    assert len(stopping.trials) == 3
    with pytest.raises(RuntimeError, match="inside an objective function or a callback"):
        stopping.stop()

    # a NaN told fails the trial (as in Optuna), with a warning, instead of leaving it running
    nan = stopping.ask()
    with pytest.warns(UserWarning, match="not finite"):
        frozen = stopping.tell(nan, float("nan"))
    assert frozen.state == optuna.trial.TrialState.FAIL

    # an objective returning as many values as the study has not objectives: each trial
    # fails (as in Optuna) and the run goes on (it raised, leaving the trial running)
    counted = optuna.create_study(storage=server.url, study_name="two-values-for-one")
    counted.optimize(lambda t: (t.suggest_float("x", 0, 1), 2.0), n_trials=3)
    assert [t.state for t in counted.trials] == [optuna.trial.TrialState.FAIL] * 3

    # an enqueued value outside the range the objective suggests is used, as in Optuna
    enqueued = optuna.create_study(storage=server.url, study_name="enqueued-outside")
    enqueued.enqueue_trial({"x": 5.0})
    enqueued.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert [t.state for t in enqueued.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert enqueued.trials[0].params == {"x": 5.0}


def test_a_range_widened_between_trials_is_searched_whole(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPO_TOKEN", server.token)
    study = optuna.create_study(
        storage=server.url, study_name="widened", sampler=optuna.samplers.RandomSampler(seed=3)
    )
    asked: list[tuple[float, float]] = []

    def objective(trial: optuna.Trial) -> float:
        high = 1.0 if trial.number < 4 else 100.0  # the search hit its bound: widened
        x = trial.suggest_float("x", 0, high)
        asked.append((high, x))
        return -x

    study.optimize(objective, n_trials=16)
    assert all(0 <= x <= high for high, x in asked)
    assert max(x for high, x in asked if high == 100.0) > 1.0  # it was stuck below 1
    with server.client() as client:
        assert client.study("widened").record.spec["space"]["x"]["high"] == 100.0


def test_a_process_that_lost_its_lease_and_tells_by_number_is_refused(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fence holds for tell(number): a process that knows only the number (it did not
    ask through this Study object) names no attempt, so once the trial was handed out again
    its tell is a 409 and nothing is stored (0 wrongly accepted)."""
    monkeypatch.setenv("HPO_TOKEN", server.token)
    with server.http() as http:
        spec = simple_spec("stale-num", lease_s=1.0, max_retries=1)
        r = http.post("/api/v1/studies", json={**spec, "define_by_run": True, "space": {}})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        first = http.post(f"/api/v1/studies/{sid}/ask").json()  # attempt 1, then silent
        trial = f"/api/v1/trials/{first['trial_id']}"
        wait_for(lambda: http.get(trial).json()["state"] == "waiting", timeout=30)
        again = http.post(f"/api/v1/studies/{sid}/ask").json()  # attempt 2, live
        assert again["trial_id"] == first["trial_id"] and again["attempt"] == 2
    stale = optuna.load_study(storage=server.url, study_name="stale-num")  # knows only the number
    with pytest.raises(Conflict, match="handed out again"):
        stale.tell(first["number"], 9.9)
    with server.http() as http:
        t = http.get(trial).json()
        assert t["state"] == "running" and t["value"] is None  # nothing wrongly accepted


def test_trials_dataframe_has_optunas_columns_in_optunas_order(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same trials in real Optuna (in memory) and on the server give the same columns,
    for the default, for ``attrs=`` and for ``multi_index=True``; single and multi-objective."""
    import optuna as real

    monkeypatch.setenv("HPO_TOKEN", server.token)
    rows = [  # a conditional parameter first seen in a later trial, and a user attribute
        {"kind": "abs", "x": 0.5},
        {"kind": "quad", "x": -1.0, "n": 2},
        {"kind": "abs", "x": 2.0},
    ]

    def objective(trial: object) -> float:
        kind = trial.suggest_categorical("kind", ["quad", "abs"])  # type: ignore[attr-defined]
        x = trial.suggest_float("x", -4.0, 4.0)  # type: ignore[attr-defined]
        n = trial.suggest_int("n", 1, 3) if kind == "quad" else 0  # type: ignore[attr-defined]
        trial.set_user_attr("seen", kind)  # type: ignore[attr-defined]
        return x**2 + n

    def both(objective_: object, **create: object) -> tuple[object, object]:
        ours = optuna.create_study(storage=server.url, **create)
        theirs = real.create_study(**{k: v for k, v in create.items() if k != "study_name"})
        for study in (ours, theirs):
            for params in rows:
                study.enqueue_trial(params)
            study.optimize(objective_, n_trials=len(rows))
        return ours, theirs

    real.logging.set_verbosity(real.logging.WARNING)
    ours, theirs = both(objective, study_name="frame-one", direction="minimize")
    for kwargs in ({}, {"attrs": ("number", "value", "params", "state")}, {"multi_index": True}):
        mine, expected = ours.trials_dataframe(**kwargs), theirs.trials_dataframe(**kwargs)
        assert list(mine.columns) == _without_system_attrs(expected.columns), kwargs
        assert mine["state"].tolist() == expected["state"].tolist()
    frame = ours.trials_dataframe()
    assert frame["params_n"].isna().tolist() == [True, False, True]

    ours, theirs = both(
        lambda t: (objective(t), t.params["x"]),
        study_name="frame-two",
        directions=["minimize", "minimize"],
    )
    expected = _without_system_attrs(theirs.trials_dataframe().columns)
    assert list(ours.trials_dataframe().columns) == expected
    empty = optuna.create_study(storage=server.url, study_name="frame-empty")
    assert empty.trials_dataframe().shape == real.create_study().trials_dataframe().shape


def _without_system_attrs(columns: object) -> list:
    """Optuna's columns less its system attributes (where it keeps an enqueued trial's
    fixed parameters; hpo keeps none)."""
    return [c for c in columns if "system_attrs" not in str(c)]  # type: ignore[attr-defined]


def test_a_non_finite_report_is_not_stored_and_the_sweep_goes_on(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A diverged run's NaN is not stored (the server keeps finite numbers): a warning, and
    the trial runs on as Optuna's would (its median rule ignores a NaN among finite values;
    real Optuna 5.1 completes the three trials of this objective too). A multi-objective
    study takes no reports."""
    monkeypatch.setenv("HPO_TOKEN", server.token)
    study = optuna.create_study(
        storage=server.url, study_name="nan-report", pruner=optuna.pruners.MedianPruner()
    )

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        for step in range(3):
            trial.report(float("nan") if trial.number == 1 and step == 1 else x, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return x

    with pytest.warns(UserWarning, match=r"report\(nan, 1\) is not finite: not stored"):
        study.optimize(objective, n_trials=3)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    with server.client() as client:
        second = study.trials[1]
        stored = client.study("nan-report").metrics(second.trial_id)
        x = second.params["x"]
        assert [(p.step, p.value) for p in stored] == [(0, x), (2, x)]

    multi = optuna.create_study(
        storage=server.url, study_name="nan-multi", directions=["minimize", "maximize"]
    )
    trial = multi.ask()
    with pytest.raises(NotImplementedError, match="multi-objective"):
        trial.report(1.0, 0)


def test_more_of_optunas_api_maps_or_says_it_does_not(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Study-level user attributes, the optuna.study module, study names, the percentile,
    threshold, patient and Wilcoxon pruners; what has no counterpart says so."""
    monkeypatch.setenv("HPO_TOKEN", server.token)
    pruners = {
        "percentile": optuna.pruners.PercentilePruner(25.0, n_warmup_steps=2),
        "threshold": optuna.pruners.ThresholdPruner(upper=10.0),
        "patient": optuna.pruners.PatientPruner(optuna.pruners.MedianPruner(), patience=2),
        "wilcoxon": optuna.pruners.WilcoxonPruner(p_threshold=0.05),
    }
    stored = {}
    for kind, pruner in pruners.items():
        study = optuna.study.create_study(
            storage=server.url, study_name=f"pruner-{kind}", pruner=pruner
        )
        stored[kind] = study._study.record.spec["pruner"]
        assert stored[kind]["type"] == kind
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert stored["patient"]["wrapped"]["compare"] == "best_so_far"  # Optuna's median rule
    assert stored["percentile"]["min_steps"] == 2 and stored["threshold"]["upper"] == 10.0
    assert {f"pruner-{k}" for k in pruners} <= set(optuna.get_all_study_names(server.url))

    study.set_user_attr("dataset", {"name": "digits", "rows": 1797})
    assert study._study.stop().state == "stopped"  # finished: notes may still be added
    study.set_user_attr("note", "done")
    again = optuna.load_study(storage=server.url, study_name=study.study_name)
    assert again.user_attrs == {"dataset": {"name": "digits", "rows": 1797}, "note": "done"}
    with pytest.raises(InvalidInput, match=r"user_attrs is \d+ bytes as JSON") as err:
        study._study.set_study_user_attrs({"big": [1] * 100_000})
    assert err.value.field == "user_attrs"
    with pytest.raises(InvalidInput, match="too deep") as err:
        deep: list = [1]
        for _ in range(40):
            deep = [deep]
        study._study.set_study_user_attrs({"too deep": deep})
    assert err.value.field.startswith("user_attrs.too deep[0]")
    assert again.user_attrs == {"dataset": {"name": "digits", "rows": 1797}, "note": "done"}

    with pytest.raises(NotImplementedError, match="cmaes"):
        optuna.samplers.CmaEsSampler()
    with pytest.raises(NotImplementedError, match="dashboard"):
        optuna.visualization.plot_optimization_history(study)
    with pytest.raises(AttributeError):
        optuna.no_such_thing  # noqa: B018
    # feature detection answers as for any missing name
    assert not hasattr(optuna, "visualization")
    assert getattr(optuna.samplers, "CmaEsSampler", None) is None
    with pytest.raises(NotImplementedError, match="Study.set_metric_names is Optuna's"):
        study.set_metric_names(["loss"])
    with pytest.raises(AttributeError, match="'Study' object has no attribute 'nope'"):
        study.nope  # noqa: B018
    # names ported scripts import or compare against exist
    assert optuna.__version__.split(".")[0].isdigit()
    for name in ("ExperimentalWarning", "UpdateFinishedTrialError", "StorageInternalError"):
        assert hasattr(optuna.exceptions, name), name
    assert issubclass(optuna.exceptions.UpdateFinishedTrialError, optuna.exceptions.OptunaError)


def test_optunas_small_habits_ties_fixed_trials_and_steps(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single-objective best_trials holds every trial with the best value; a FixedTrial's
    params are those suggested and a choice it lacks is a ValueError; a negative report step
    is a ValueError and 1.5 is step 1; a trial knows when it started (each as in Optuna)."""
    monkeypatch.setenv("HPO_TOKEN", server.token)
    study = optuna.create_study(storage=server.url, study_name="ties")
    for v in (2.0, 1.0, 1.0):
        study.tell(study.ask(), v)
    assert [t.number for t in study.best_trials] == [1, 2]

    fixed = optuna.trial.FixedTrial({"x": 0.5, "unused": 1, "c": "z"})
    assert fixed.suggest_float("x", 0, 1) == 0.5 and fixed.params == {"x": 0.5}
    with pytest.raises(ValueError, match="'z' not in \\('a', 'b'\\)"):
        fixed.suggest_categorical("c", ["a", "b"])

    def objective(trial: optuna.Trial) -> float:
        assert abs((datetime.datetime.now() - trial.datetime_start).total_seconds()) < 60
        x = trial.suggest_float("x", 0, 1)
        with pytest.raises(ValueError, match="cannot be negative"):
            trial.report(x, -1)
        trial.report(x, 1.5)
        trial.report(x, np.int64(2))  # a numpy step, as Optuna takes it
        return x

    study.optimize(objective, n_trials=1)
    last = study.trials[-1]
    assert last.state == optuna.trial.TrialState.COMPLETE, last
    assert last.intermediate_values == {1: last.params["x"], 2: last.params["x"]}


def test_add_trials_stores_finished_trials_and_refuses_a_running_one(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``study.add_trial(s)`` with ``create_trial``: complete (one or two values), pruned and
    failed trials are stored as they are; a running one is refused and nothing is stored."""
    monkeypatch.setenv("HPO_TOKEN", server.token)
    study = optuna.create_study(storage=server.url, study_name="added")
    study.add_trials(
        [
            optuna.create_trial(params={"x": 0.5}, value=0.25, user_attrs={"from": "paper"}),
            optuna.create_trial(params={"x": 2.0}, state=optuna.trial.TrialState.PRUNED),
            optuna.create_trial(params={"x": 3.0}, state=optuna.trial.TrialState.FAIL),
        ]
    )
    added = study.trials
    assert [(t.params, t.state, t.values) for t in added] == [
        ({"x": 0.5}, optuna.trial.TrialState.COMPLETE, [0.25]),
        ({"x": 2.0}, optuna.trial.TrialState.PRUNED, None),
        ({"x": 3.0}, optuna.trial.TrialState.FAIL, None),
    ]
    assert added[0].user_attrs == {"from": "paper"} and study.best_value == 0.25
    running = optuna.create_trial(params={"x": 1.0}, state=optuna.trial.TrialState.RUNNING)
    with pytest.raises(ValueError, match="^a trial is RUNNING: only finished trials"):
        study.add_trials([optuna.create_trial(params={"x": 1.0}, value=1.0), running])
    assert len(study.trials) == 3


def test_optunas_older_suggest_names_system_attrs_states_and_logging(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``suggest_uniform / loguniform / discrete_uniform`` learn the domains Optuna gives
    them (a float, a log float, a float with a step); ``set_system_attr`` is kept as a user
    attribute; ``TrialState.is_finished`` and the logging switches behave as Optuna's."""
    monkeypatch.setenv("HPO_TOKEN", server.token)
    study = optuna.create_study(storage=server.url, study_name="older-names")

    def objective(trial: optuna.Trial) -> float:
        u = trial.suggest_uniform("u", -1.0, 1.0)
        lr = trial.suggest_loguniform("lr", 1e-4, 1e-1)
        q = trial.suggest_discrete_uniform("q", 0.0, 1.0, 0.25)
        trial.set_system_attr("seen", [u, lr, q])
        return u + lr + q

    study.optimize(objective, n_trials=3)
    space = study._study.record.spec["space"]
    assert (space["u"]["type"], space["u"]["low"], space["u"]["high"]) == ("float", -1.0, 1.0)
    assert space["u"].get("log", False) is False and space["u"].get("step") is None
    assert space["lr"]["log"] is True and (space["lr"]["low"], space["lr"]["high"]) == (1e-4, 0.1)
    assert space["q"]["step"] == 0.25
    for t in study.trials:
        assert t.state.is_finished() and not optuna.trial.TrialState.RUNNING.is_finished()
        assert t.user_attrs["seen"] == [t.params["u"], t.params["lr"], t.params["q"]]
        assert 1e-4 <= t.params["lr"] <= 0.1 and t.params["q"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    before = optuna.logging.get_verbosity()
    try:
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        assert optuna.logging.get_verbosity() == optuna.logging.ERROR
    finally:
        optuna.logging.set_verbosity(before)


def test_a_ported_scripts_habits_behave_as_in_optuna(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a script written for Optuna 5 does and expects: trial.study.stop() ends the run
    (the study goes on), a parameter asked twice in another domain, Optuna's errors and
    checks of tell and create_trial, a pruner judging step 0, enqueue's skip_if_exists on
    the enqueued values, MaxTrialsCallback, naive local times, TrialState's text."""
    monkeypatch.setenv("HPO_TOKEN", server.token)
    study = optuna.create_study(
        storage=server.url,
        study_name="habits",
        pruner=optuna.pruners.ThresholdPruner(upper=1.0),
    )
    assert study._study.record.spec["sampler"]["multivariate"] is False  # Optuna's default

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        with pytest.raises(ValueError, match="different distribution kind"):
            trial.suggest_int("x", 0, 10)
        with pytest.raises(ValueError, match="different log configuration"):
            trial.suggest_float("x", 0.1, 1.0, log=True)
        kind = trial.suggest_categorical("kind", ["a", "b"])
        with pytest.raises(ValueError, match="dynamic value space"):
            trial.suggest_categorical("kind", ["c", "d"])
        assert trial.suggest_categorical("kind", ["a", "b"]) == kind
        with pytest.raises(ValueError, match="low"):
            trial.suggest_float("bad", 1.0, 0.0)
        if trial.number == 1:
            trial.study.stop()  # as Optuna documents: from the objective
        return x

    study.optimize(objective, n_trials=5)
    assert len(study.trials) == 2  # stopped after trial 1
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=1)  # the study goes on
    assert len(study.trials) == 3

    judged = study.ask()  # the threshold pruner judges step 0 (no warm-up given)
    judged.suggest_float("x", 0.0, 1.0)
    judged.report(5.0, 0)
    assert judged.should_prune()
    study.tell(judged, state=optuna.trial.TrialState.PRUNED)

    told = study.ask()
    with pytest.raises(ValueError, match="Cannot tell with state TrialState.RUNNING"):
        study.tell(told, 1.0, state=optuna.trial.TrialState.RUNNING)
    with pytest.raises(ValueError, match="Values cannot be specified"):
        study.tell(told, 1.0, state=optuna.trial.TrialState.FAIL)
    with pytest.warns(UserWarning, match="number of the values 2 did not match"):
        assert study.tell(told, [1.0, 2.0]).state == optuna.trial.TrialState.FAIL

    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        optuna.create_study(storage=server.url, study_name="habits")
    with pytest.raises(KeyError):
        optuna.load_study(storage=server.url, study_name="no-such-study")
    with pytest.raises(KeyError):
        optuna.delete_study(storage=server.url, study_name="no-such-study")
    with pytest.raises(KeyError):  # a name of digits is a name, not the id of some study
        optuna.load_study(storage=server.url, study_name=str(study._study.id))
    other_kind = study.ask()  # "x" was learned as a float: the server refuses an int (422)
    with pytest.raises(ValueError, match="x"):
        other_kind.suggest_int("x", 0, 10)
    study.tell(other_kind, state=optuna.trial.TrialState.FAIL)
    assert issubclass(optuna.TrialPruned, optuna.exceptions.OptunaError)

    with pytest.raises(TypeError):
        optuna.create_trial(vaule=1.0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="supposed to be set for a complete trial"):
        optuna.create_trial(params={"x": 0.5})
    with pytest.raises(ValueError, match="isn't contained"):
        dist = optuna.distributions.FloatDistribution(0.0, 1.0)
        optuna.create_trial(params={"x": 2.0}, distributions={"x": dist}, value=1.0)
    with pytest.raises(ValueError, match="low <= high"):
        optuna.distributions.FloatDistribution(1.0, 0.0)
    with pytest.raises(NotImplementedError, match="constraints"):
        optuna.samplers.TPESampler(constraints_func=lambda t: [0.0])

    # skip_if_exists compares the values enqueued, not the params the trial also suggested
    queued = optuna.create_study(storage=server.url, study_name="queued")
    queued.enqueue_trial({"x": 0.5})
    queued.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1), 1)
    queued.enqueue_trial({"x": 0.5}, skip_if_exists=True)
    assert [t.state for t in queued.trials] == [optuna.trial.TrialState.COMPLETE]

    capped = optuna.create_study(storage=server.url, study_name="capped")
    capped.optimize(
        lambda t: t.suggest_float("x", 0, 1),
        n_trials=10,
        callbacks=[optuna.study.MaxTrialsCallback(3)],
    )
    assert len(capped.trials) == 3
    first = capped.trials[0]
    assert first.datetime_start is not None and first.datetime_start.tzinfo is None
    assert abs((datetime.datetime.now() - first.datetime_start).total_seconds()) < 600
    assert str(first.state) == "TrialState.COMPLETE"

    # the objective re-run on a finished trial's values, or on values of one's own
    def rerun(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        trial.report(x, 0)
        assert not trial.should_prune()
        return x

    assert rerun(capped.best_trial) == capped.best_value
    assert rerun(optuna.trial.FixedTrial({"x": 0.25})) == 0.25
    with pytest.raises(ValueError, match="'x' is not found"):
        rerun(optuna.trial.FixedTrial({"y": 0.25}))


def test_trial_times_are_naive_local_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored time (UTC) reads back as Optuna's do: naive, in the machine's time zone."""
    from hpo.api.optuna._trial import _local

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        noon_utc = datetime.datetime(2026, 1, 15, 12, 0, tzinfo=datetime.timezone.utc)
        assert _local(noon_utc) == datetime.datetime(2026, 1, 15, 7, 0)  # EST, UTC-5
        assert _local(None) is None
    finally:
        monkeypatch.undo()
        time.tzset()


def test_trials_read_back_carry_their_reports_and_distributions(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Optuna's: a trial read back has the objective's reports as ``intermediate_values``
    (every trial's, read together for ``get_trials``) and its parameters' distributions."""
    monkeypatch.setenv("HPO_TOKEN", server.token)
    study = optuna.create_study(
        storage=server.url, study_name="read-back", pruner=optuna.pruners.NopPruner()
    )
    seen: dict[int, dict[int, float]] = {}

    def reporting(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.suggest_int("n", 1, 8, log=True)
        trial.suggest_categorical("opt", ["a", "b"])
        for step in range(trial.number):  # trial k reports steps 0 .. k - 1
            trial.report(x + step, step)
        return x

    def note(_study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        seen[frozen.number] = frozen.intermediate_values

    study.optimize(reporting, n_trials=4, callbacks=[note])
    asked = study.ask()
    x = asked.suggest_float("x", 0.0, 1.0)
    asked.report(0.25, 7)
    told = study.tell(asked, x)
    assert told.intermediate_values == {7: 0.25}
    assert told.distributions == {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}

    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    for t in trials[:4]:
        expected = {step: t.params["x"] + step for step in range(t.number)}
        assert t.intermediate_values == expected == seen[t.number]
        assert t.distributions == {
            "x": optuna.distributions.FloatDistribution(0.0, 1.0),
            "n": optuna.distributions.IntDistribution(1, 8, log=True),
            "opt": optuna.distributions.CategoricalDistribution(("a", "b")),
        }
    assert trials[4].intermediate_values == {7: 0.25}
    best = study.best_trial
    assert best.intermediate_values == trials[best.number].intermediate_values
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert [t.intermediate_values for t in complete] == [t.intermediate_values for t in trials]
    assert study.get_trials(states=(optuna.trial.TrialState.PRUNED,)) == []
