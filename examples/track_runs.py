"""Look at an hpo study in TensorBoard and MLflow: tune gradient descent on a small least-squares
problem (numpy only), then write one run per trial (its params, its loss curve, its final
value, tags naming the trial) with the same functions ``hpo export`` uses.

    hpo serve &                                       # in another shell
    python examples/track_runs.py --trials 12 --tensorboard runs/ --mlflow ./mlruns
    tensorboard --logdir runs/                        # Scalars, and HParams to compare trials

Trials that ``hpo serve`` dispatches to Ray can write their curves to TensorBoard while they
run instead: ``HPO_TENSORBOARD_DIR=runs hpo serve`` then ``hpo submit examples/digits-cnn.yaml``
and ``tensorboard --logdir runs`` (docs/integrations.md).

Needs ``pip install 'hpo[integrations]'``.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from hpo.api.client import Client, TrialHandle
from hpo.api.integrations import export

SPEC: dict[str, Any] = {
    "name": "track-runs-least-squares",
    "objective": {"metric": "loss", "direction": "minimize"},
    "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 4},
    "space": {
        "lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
        "momentum": {"type": "float", "low": 0.0, "high": 0.95},
    },
}


def objective(trial: TrialHandle, epochs: int = 20) -> float:
    """Gradient descent with momentum on ``|Xw - y|^2 / n``; the loss after each epoch is
    reported, the last one is the trial's value."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = x @ np.arange(1.0, 6.0) + rng.normal(scale=0.1, size=200)
    w, velocity = np.zeros(5), np.zeros(5)
    loss = float(np.mean(y**2))
    for epoch in range(1, epochs + 1):
        grad = 2 * x.T @ (x @ w - y) / len(y)
        velocity = trial.params["momentum"] * velocity - trial.params["lr"] * grad
        w = w + velocity
        loss = float(np.mean((x @ w - y) ** 2))
        if not np.isfinite(loss):
            break  # diverged: told failed by study.optimize
        trial.report(epoch, {"loss": loss})
    return loss


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="hpo server (default: $HPO_URL or http://127.0.0.1:8000)")
    p.add_argument("--token", help="API token (default: $HPO_TOKEN or the local token file)")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--name", default=SPEC["name"], help="study name")
    p.add_argument("--tensorboard", metavar="DIR", help="write a TensorBoard run per trial")
    p.add_argument("--mlflow", metavar="URI", help="write an MLflow run per trial (a folder ok)")
    a = p.parse_args(argv)
    with Client(a.url, a.token) as client:
        study = client.create_study({**SPEC, "name": a.name}, load_if_exists=True)
        study.optimize(objective, n_trials=a.trials)
        runs = export.study_runs(study)
        if a.tensorboard:
            export.write_tensorboard(runs, a.tensorboard)
            print(f"{len(runs)} runs in {a.tensorboard}: tensorboard --logdir {a.tensorboard}")
        if a.mlflow:
            export.write_mlflow(runs, a.mlflow, study.name)
            print(f"{len(runs)} runs in MLflow experiment {study.name!r} at {a.mlflow}")
        best = study.best_trial
        print(f"best loss {best.value:.4g} with {best.params}" if best else "no trial ended")


if __name__ == "__main__":
    main()
