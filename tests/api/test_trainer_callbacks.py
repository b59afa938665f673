"""The Hugging Face ``Trainer`` and PyTorch Lightning callbacks against a served control
plane: each example runs a trial for a few steps and its metrics land on the server, and a
trial that hpo prunes stops training at the step it was pruned and is told pruned."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from hpo.api.client import Client, Study
from tests.conftest import EXAMPLES, ServerProcess, example

FAR = 10**9  # a step past every other: the median pruner compares each step with its value


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("callbacks-server")
    with ServerProcess(f"sqlite:///{data / 'hpo.db'}", data, {"HPO_SCHEDULER": "false"}) as proc:
        yield proc


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread (and do not crowd a shared CI machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seeded_study(
    server: ServerProcess, spec: dict, name: str, metric: str, min_steps: int
) -> tuple[Client, Study]:
    """A study whose one complete trial reported ``metric`` 0.0: the median pruner (after one
    startup trial) prunes any later trial at its first report at or past ``min_steps``."""
    pruner = {**spec["pruner"], "n_startup_trials": 1, "min_steps": min_steps}
    spec = {**spec, "name": name, "pruner": pruner}
    client = server.client()
    study = client.create_study(spec)
    seed = study.ask()
    study.report(seed, step=FAR, metrics={metric: 0.0})
    study.tell(seed, value=0.0)
    return client, study


def reported_steps(study: Study, trial_id: int, name: str) -> list[int]:
    return [p.step for p in study.metrics(trial_id, name)]


def test_hf_trainer_example_reports_and_stops_when_pruned(served: ServerProcess) -> None:
    hf = example("hf_trainer")
    args = ["--url", served.url, "--token", served.token, "--name", "hf-example"]
    hf.main([*args, "--trials", "1", "--max-steps", "4", "--eval-steps", "2"])
    with served.client() as client:
        study = client.study("hf-example")
        (trial,) = study.trials()
        assert trial.state == "complete" and trial.value > 0
        assert reported_steps(study, trial.id, "eval_loss") == [2, 4]
        assert reported_steps(study, trial.id, "loss") == [2, 4]
        names = {p.name for p in study.metrics(trial.id)}
        assert {"eval_loss", "loss", "learning_rate"} <= names
        assert not {n for n in names if n.endswith(("_runtime", "_per_second", "total_flos"))}

    client, study = seeded_study(served, hf.SPEC, "hf-pruned", "eval_loss", min_steps=3)
    with client:
        # the first evaluation at or past min_steps (step 4 of 40) is judged and pruned
        study.optimize(lambda t: hf.objective(t, max_steps=40, eval_steps=2), n_trials=1)
        pruned = study.trials()[-1]
        assert pruned.state == "pruned" and pruned.pruned["step"] == 4
        assert reported_steps(study, pruned.id, "eval_loss") == [2, 4]  # nothing after


def test_hf_trainer_under_torchrun_trains_one_trial_on_every_rank_and_stops_them_together(
    served: ServerProcess,
) -> None:
    """Two DDP ranks (gloo) under torchrun: rank 0 asks each trial and every rank trains it
    (one trial per trial, not one per rank); hpo's prune answer at step 4 stops both ranks at
    that step, and the job ends (no rank left waiting in a collective)."""
    hf = example("hf_trainer")
    client, study = seeded_study(served, hf.SPEC, "hf-torchrun", "eval_loss", min_steps=3)
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
        str(EXAMPLES / "hf_trainer.py"),
        *("--url", served.url, "--name", "hf-torchrun"),
        *("--trials", "2", "--max-steps", "40", "--eval-steps", "2"),
    ]
    env = {**os.environ, "HPO_TOKEN": served.token, "OMP_NUM_THREADS": "1"}
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    with client:
        trials = study.trials()[1:]  # after the seed
        assert [(t.state, t.pruned["step"]) for t in trials] == [("pruned", 4)] * 2
        for t in trials:
            assert reported_steps(study, t.id, "eval_loss") == [2, 4]
        ran = re.findall(r"rank (\d): trial (\d+) (\{.*?\}) ran to step (\d+)", job.stdout)
        by_rank = {
            (int(rank), int(number)): (ast.literal_eval(params), int(step))
            for rank, number, params, step in ran
        }
        assert by_rank == {(rank, t.number): (t.params, 4) for rank in (0, 1) for t in trials}, (
            job.stdout[-3000:]
        )


def test_lightning_example_reports_and_stops_when_pruned(served: ServerProcess) -> None:
    digits = example("lightning_digits")
    args = ["--url", served.url, "--token", served.token, "--name", "lightning-example"]
    digits.main([*args, "--trials", "1", "--epochs", "2", "--batches", "4"])
    with served.client() as client:
        study = client.study("lightning-example")
        (trial,) = study.trials()
        assert trial.state == "complete" and trial.value > 0
        assert reported_steps(study, trial.id, "val_loss") == [4, 8]  # one per epoch
        assert len(study.metrics(trial.id, "val_acc")) == 2

    client, study = seeded_study(served, digits.SPEC, "lightning-pruned", "val_loss", min_steps=1)
    with client:
        study.optimize(lambda t: digits.objective(t, epochs=20, batches_per_epoch=3), n_trials=1)
        pruned = study.trials()[-1]
        assert pruned.state == "pruned" and pruned.pruned["step"] == 3  # the first epoch
        assert reported_steps(study, pruned.id, "val_loss") == [3]


def test_a_trial_from_ask_needs_its_study() -> None:
    from hpo.api.integrations.reporting import TrialReporter

    with pytest.raises(ValueError, match="study"):
        TrialReporter({"trial_id": 1, "number": 0, "params": {}})
