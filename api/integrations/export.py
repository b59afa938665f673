"""Write a study's trials as TensorBoard runs or MLflow runs: one run per trial with its
params, its final value(s), every metric series at every step, and tags naming the study, the
trial number and its state. ``hpo export STUDY --tensorboard DIR`` / ``--mlflow [URI]``.

Exporting again replaces what an earlier export wrote for the same trials (TensorBoard: the
run folder's event files; MLflow: the runs tagged with the same ``hpo.trial_id``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from hpo.service.export import TrialRun, trial_runs

if TYPE_CHECKING:
    from hpo.api.client import Study

INSTALL_HINT = "pip install 'hpo[integrations]'"
# MLflow's log_batch limits per call.
MLFLOW_BATCH = {"metrics": 1000, "params": 100, "tags": 100}
MLFLOW_STATUS = {"complete": "FINISHED", "failed": "FAILED", "pruned": "KILLED"}


def study_runs(study: Study) -> list[TrialRun]:
    """Every trial of ``study`` (read over the API) as a run with its metric series."""
    return trial_runs(study.refresh(), study.trials(), lambda t: study.metrics(t.id))


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this export needs {module.split('.')[0]}: {INSTALL_HINT}") from exc


# ------------------------------------------------------------------ TensorBoard


def write_tensorboard(runs: Sequence[TrialRun], logdir: Path | str) -> list[Path]:
    """One folder per trial under ``logdir`` (``trial-0007``) holding an event file: each
    metric series as scalars at its steps, the final value(s) as scalars at the last step, and
    the params with the ``hpo.*`` tags as an HParams session (TensorBoard's HParams tab then
    compares trials). Returns the run folders."""
    _need("tensorboard")
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.plugins.hparams import summary_v2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    from hpo.workers.tensorboard import scalar_event

    folders = []
    for run in runs:
        folder = Path(logdir) / run.name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("events.out.tfevents.*"):  # an earlier export of this trial
            old.unlink()
        writer = EventFileWriter(str(folder))
        start = _seconds(run.started_at) or 0.0
        hparams = {**{k: _hparam(v) for k, v in run.params.items()}, **run.tags}
        session = summary_v2.hparams_pb(hparams, trial_id=run.name, start_time_secs=start)
        writer.add_event(Event(wall_time=start, step=0, summary=session))
        last = 0
        for name, points in run.series.items():
            for step, value, at in points:
                writer.add_event(scalar_event(name, value, step, _seconds(at) or start))
                last = max(last, step)
        end = _seconds(run.finished_at) or start
        for name, value in run.values.items():
            writer.add_event(scalar_event(name, value, last, end))
        writer.close()
        folders.append(folder)
    return folders


def _hparam(value: Any) -> bool | int | float | str:
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _seconds(at: datetime | None) -> float | None:
    return None if at is None else at.timestamp()


# ------------------------------------------------------------------ MLflow


def mlflow_uri(target: str | None) -> str:
    """The tracking URI to write to: ``target`` (a folder, a ``file://`` URI or any MLflow
    tracking URI), else ``$MLFLOW_TRACKING_URI``, else ``./mlruns``. A folder becomes a
    ``file://`` URI; MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is
    set, which is set here for such a URI (a local file store needs no server)."""
    target = target or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
    scheme = urlparse(target).scheme
    if scheme in ("", "file"):
        path = Path(urlparse(target).path if scheme == "file" else target).expanduser()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return path.resolve().as_uri()
    return target


def write_mlflow(runs: Sequence[TrialRun], uri: str | None, experiment: str) -> list[str]:
    """One MLflow run per trial in ``experiment`` (made when missing) at ``uri`` (see
    :func:`mlflow_uri`): params, every metric series with its steps and times, the final
    value(s), the ``hpo.*`` tags, and the trial's start, end and status (complete: FINISHED,
    failed: FAILED, pruned: KILLED, else RUNNING). Returns the run ids."""
    _need("mlflow")
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(uri))
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    ids = []
    for run in runs:
        earlier = client.search_runs(
            [experiment_id], filter_string=f"tags.`hpo.trial_id` = '{run.tags['hpo.trial_id']}'"
        )
        for old in earlier:
            client.delete_run(old.info.run_id)
        start = _millis(run.started_at)
        created = client.create_run(experiment_id, start_time=start, run_name=run.name)
        run_id = created.info.run_id
        metrics = [
            Metric(name, value, _millis(at) or 0, step)
            for name, points in run.series.items()
            for step, value, at in points
        ]
        last = max((m.step for m in metrics), default=0)
        end = _millis(run.finished_at)
        metrics += [Metric(n, v, end or start or 0, last) for n, v in run.values.items()]
        params = [Param(k, str(v)) for k, v in run.params.items()]
        tags = [RunTag(k, v) for k, v in run.tags.items()]
        for i in range(0, len(metrics), MLFLOW_BATCH["metrics"]):
            client.log_batch(run_id, metrics=metrics[i : i + MLFLOW_BATCH["metrics"]])
        for i in range(0, len(params), MLFLOW_BATCH["params"]):
            client.log_batch(run_id, params=params[i : i + MLFLOW_BATCH["params"]])
        for i in range(0, len(tags), MLFLOW_BATCH["tags"]):
            client.log_batch(run_id, tags=tags[i : i + MLFLOW_BATCH["tags"]])
        status = MLFLOW_STATUS.get(run.state)
        if status is not None:
            client.set_terminated(run_id, status, end_time=end)
        ids.append(run_id)
    return ids


def _millis(at: datetime | None) -> int | None:
    return None if at is None else int(at.timestamp() * 1000)
