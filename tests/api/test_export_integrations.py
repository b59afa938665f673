"""``hpo export STUDY --tensorboard DIR`` and ``--mlflow [URI]`` against a served control
plane: one run per trial with its params, every metric point at its step, final value and
tags, read back with TensorBoard's and MLflow's own readers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hpo.api.cli import main
from tests.conftest import ServerProcess, example, simple_spec


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One served control plane for the module: the exports only read it."""
    data = tmp_path_factory.mktemp("export-server")
    with ServerProcess(f"sqlite:///{data / 'hpo.db'}", data, {"HPO_SCHEDULER": "false"}) as proc:
        yield proc


@pytest.fixture(scope="module")
def finished_study(sqlite_server: ServerProcess) -> dict:
    """Three trials: complete (3 steps of loss, 2 of acc), pruned (2 steps), running (1)."""
    with sqlite_server.client() as client:
        study = client.create_study(simple_spec("exported"))
        trials = [study.ask() for _ in range(3)]
        for step in range(3):
            study.report(trials[0], step=step, metrics={"loss": 1.0 / (step + 1)})
        for step in range(2):
            study.report(trials[0], step=step * 10, metrics={"acc": 0.5 + step / 10})
            study.report(trials[1], step=step, metrics={"loss": 2.0 + step})
        study.report(trials[2], step=0, metrics={"loss": 3.0})
        study.tell(trials[0], value=0.25)
        study.tell(trials[1], state="pruned")
    return {"study": study, "trials": trials}


def cli(server: ServerProcess, *args: str) -> int:
    return main(["export", *args, "--url", server.url, "--token", server.token])


def test_tensorboard_export_writes_a_run_per_trial(
    sqlite_server: ServerProcess, finished_study: dict, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    logdir = tmp_path / "tb"
    for _ in range(2):  # exporting again replaces the runs, never doubles their points
        assert cli(sqlite_server, "exported", "--tensorboard", str(logdir)) == 0
    assert sorted(p.name for p in logdir.iterdir()) == ["trial-0000", "trial-0001", "trial-0002"]
    first = finished_study["trials"][0]

    acc = EventAccumulator(str(logdir / "trial-0000")).Reload()
    # TensorBoard keeps scalars as 32-bit floats
    loss = [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("loss")]
    assert loss == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    acc_points = [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("acc")]
    assert acc_points == [(0, 0.5), (10, 0.6)]
    assert [(e.step, e.value) for e in acc.Scalars("value")] == [(10, 0.25)]
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["x"].number_value == pytest.approx(first.params["x"])
    assert hparams["n"].number_value == first.params["n"]
    assert hparams["hpo.state"].string_value == "complete"
    assert hparams["hpo.trial"].string_value == "0"
    assert hparams["hpo.study"].string_value == "exported"

    pruned = EventAccumulator(str(logdir / "trial-0001")).Reload()
    assert [e.value for e in pruned.Scalars("loss")] == [2.0, 3.0]
    with sqlite_server.client() as client:  # a pruned trial keeps the value it was pruned at
        told = client.trial(finished_study["trials"][1].trial_id).value
    assert [e.value for e in pruned.Scalars("value")] == ([told] if told is not None else [])
    running = EventAccumulator(str(logdir / "trial-0002")).Reload()
    assert "value" not in running.Tags()["scalars"]


def test_mlflow_export_to_a_local_file_store(
    sqlite_server: ServerProcess, finished_study: dict, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    assert cli(sqlite_server, "exported", "--mlflow", str(store)) == 0  # a folder
    assert cli(sqlite_server, "exported", "--mlflow", store.as_uri()) == 0  # again, as a URI
    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("exported")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["trial-0000", "trial-0001", "trial-0002"]  # replaced, not doubled

    first, params = runs["trial-0000"], finished_study["trials"][0].params
    assert first.data.params == {"x": str(params["x"]), "n": str(params["n"])}
    assert first.data.tags["hpo.state"] == "complete"
    assert first.data.tags["hpo.trial"] == "0"
    assert first.data.tags["hpo.study"] == "exported"
    assert first.info.status == "FINISHED" and first.data.metrics["value"] == 0.25
    history = client.get_metric_history(first.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    acc = client.get_metric_history(first.info.run_id, "acc")
    assert sorted(m.step for m in acc) == [0, 10]
    assert runs["trial-0001"].info.status == "KILLED"
    assert runs["trial-0001"].data.tags["hpo.state"] == "pruned"
    assert runs["trial-0002"].info.status == "RUNNING"


def test_export_needs_one_target(sqlite_server: ServerProcess, finished_study: dict) -> None:
    with pytest.raises(SystemExit) as exc:
        cli(sqlite_server, "exported")
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli(sqlite_server, "exported", "--csv", "--tensorboard", "x")


def test_track_runs_example_writes_every_trial_to_tensorboard_and_mlflow(
    sqlite_server: ServerProcess, tmp_path: Path
) -> None:
    """examples/track_runs.py: a study run in-process, then one TensorBoard and one MLflow run
    per trial holding the loss curve the server stored."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracked = example("track_runs")
    logdir, store = tmp_path / "tb", tmp_path / "mlruns"
    args = ["--url", sqlite_server.url, "--token", sqlite_server.token, "--name", "tracked"]
    tracked.main([*args, "--trials", "3", "--tensorboard", str(logdir), "--mlflow", str(store)])
    with sqlite_server.client() as client:
        study = client.study("tracked")
        trials = study.trials()
        assert len(trials) == 3 and all(t.state in ("complete", "failed") for t in trials)
        curves = {
            f"trial-{t.number:04d}": [(p.step, p.value) for p in study.metrics(t.id, "loss")]
            for t in trials
        }
    assert sorted(p.name for p in logdir.iterdir()) == sorted(curves)
    assert all(curves.values())
    for name, points in curves.items():
        scalars = EventAccumulator(str(logdir / name)).Reload().Scalars("loss")
        assert [e.step for e in scalars] == [step for step, _ in points]
        assert [e.value for e in scalars] == pytest.approx([v for _, v in points], rel=1e-6)
    mlflow = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = mlflow.get_experiment_by_name("tracked")
    runs = {r.info.run_name: r for r in mlflow.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted(curves)
    for name, points in curves.items():
        history = mlflow.get_metric_history(runs[name].info.run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == points
