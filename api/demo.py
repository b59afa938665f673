"""``hpo demo``: start a fresh ``hpo serve`` and run a small study against it, end to end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

console = Console(stderr=True)

ASK_TELL_SPEC: dict[str, Any] = {
    "name": "demo-digits-mlp",
    "description": "scikit-learn MLP on the digits images, trained in the client over ask/tell",
    "objective": {"metric": "val_accuracy", "direction": "maximize"},
    "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 6},
    "pruner": {"type": "asha", "min_steps": 2, "reduction_factor": 3},
    "budget": {"max_trials": 20},
    "space": {
        "lr": {"type": "float", "low": 1e-4, "high": 3e-1, "log": True},
        "hidden": {"type": "categorical", "choices": [16, 32, 64, 128]},
        "alpha": {"type": "float", "low": 1e-6, "high": 1e-1, "log": True},
        "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(data_dir: Path, *, env: dict[str, str] | None = None) -> Iterator[tuple[str, str]]:
    """Run ``hpo serve`` in a subprocess on a free port; yields (url, token)."""
    port = free_port()
    token = "demo-" + os.urandom(8).hex()
    full_env = {**os.environ, "HPO_DATA_DIR": str(data_dir), "HPO_TOKEN": token, **(env or {})}
    log = open(data_dir / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo.api.cli", "serve", "--port", str(port)],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, data_dir / "serve.log")
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hpo serve exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"hpo serve did not answer on {url} within {timeout_s} s")


def digits_mlp_objective(trial: Any, epochs: int = 12) -> float:
    """Train an MLP on the digits data, epoch by epoch, reporting validation accuracy."""
    import warnings

    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        x / 16.0, y, test_size=0.25, random_state=0, stratify=y
    )
    p = trial.params
    model = MLPClassifier(
        hidden_layer_sizes=(p["hidden"],),
        learning_rate_init=p["lr"],
        alpha=p["alpha"],
        batch_size=p["batch_size"],
        random_state=trial.number,
    )
    classes = np.unique(y)
    accuracy = 0.0
    for epoch in range(1, epochs + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.partial_fit(x_train, y_train, classes=classes)
        accuracy = float(model.score(x_val, y_val))
        if trial.report(epoch, {"val_accuracy": accuracy}):
            break
    return accuracy


def run_demo(*, trials: int | None = None, ask_tell: bool = True, keep: bool = False) -> int:
    """Start a server on a temporary data dir and run the demo study; returns an exit code."""
    from hpo.api.cli import _watch
    from hpo.api.client import Client

    with tempfile.TemporaryDirectory(prefix="hpo-demo-") as tmp, served(Path(tmp)) as (url, tok):
        console.print(f"[bold]hpo demo[/bold]: server at {url} (data in {tmp})")
        client = Client(url, tok)
        spec = dict(ASK_TELL_SPEC)
        if trials:
            spec["budget"] = {**spec["budget"], "max_trials": trials}
        study = client.create_study(spec)
        console.print(f"study {study.id} {study.name!r}: TPE + ASHA, {spec['budget']} ")
        started = time.monotonic()
        study.optimize(_progress(digits_mlp_objective))
        code = _watch(study, poll_s=0.2)
        frame = study.trials_dataframe()
        console.print(frame[["number", "state", "value", "params_lr", "params_hidden"]].to_string())
        console.print(f"{len(frame)} trials in {time.monotonic() - started:.1f} s")
        if keep:
            console.print(f"serving on {url} (token {tok}); Ctrl-C to stop")
            while True:
                time.sleep(3600)
        return code


def _progress(objective: Any) -> Any:
    def wrapped(trial: Any) -> float:
        value = objective(trial)
        state = "pruned" if trial.should_stop else "done"
        console.print(
            f"  trial {trial.number:>3} {state:<6} val_accuracy={value:.4f} "
            f"lr={trial.params['lr']:.2e} hidden={trial.params['hidden']}"
        )
        return value

    return wrapped
