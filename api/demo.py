"""``hpo demo``: start a fresh ``hpo serve`` and run a small study against it, end to end."""

from __future__ import annotations

import errno
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from hpo.api.progress import console, wait_for_test_metrics, watch

DISPATCH_SPEC: dict[str, Any] = {
    "name": "demo-digits-cnn",
    "description": "A CNN on the digits images, 2 DDP workers per trial on the local Ray",
    "objective": {"metric": "val_accuracy", "direction": "maximize"},
    "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 5},
    "pruner": {"type": "asha", "min_steps": 2, "reduction_factor": 3},
    "budget": {"max_trials": 16, "max_concurrent": 1},
    "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
    "trainable": {"name": "image-classification", "config": {"epochs": 12}},
    "space": {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
        "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
        "momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"optimizer": ["sgd"]}},
        "channels": {"type": "int", "low": 4, "high": 32, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
    },
}

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


def _ephemeral_low() -> int:
    """Where the kernel's range for outgoing connections' local ports starts (Linux)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports this process has handed out, each with a lock file held open until the process ends:
# another process drawing ports (the two pytest processes of the suite, a second `hpo demo`)
# skips them, even while their server is not up yet or is down for a restart.
_HANDED_OUT: dict[int, int] = {}
_HANDED_OUT_LOCK = threading.Lock()


def _reserve(port: int) -> bool:
    """Claim ``port`` for this process (an exclusive flock on a file named after it), unless
    this or another process claimed it first. Where flock or the file is missing, only this
    process's own claims count."""
    if port in _HANDED_OUT:
        return False
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        _HANDED_OUT[port] = -1
        return True
    folder = Path(tempfile.gettempdir()) / "hpo-ports"
    try:
        folder.mkdir(exist_ok=True)
        fd = os.open(folder / f"{port}.lock", os.O_CREAT | os.O_RDWR, 0o666)
    except OSError:  # no room for the file, no descriptor left: this process's claims count
        _HANDED_OUT[port] = -1
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False  # another process holds it
        _HANDED_OUT[port] = -1  # no flock on this filesystem: this process's claims count
        return True
    _HANDED_OUT[port] = fd  # released when this process ends
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now (none handed out before by this or another process
    using this function), drawn at random between 20000 and the kernel's ephemeral range.
    A port from ``bind(0)`` lies in that range, where any outgoing connection may take it as
    its local port before the server meant for it binds it (and a server restarted on its
    port after a kill is exposed as long as it is down). From 20000: above Ray's default
    worker ports (10002-19999). Where the ephemeral range starts lower (tuned to
    1024-65535, say), no port is safe from it; 20000-32767 it is."""
    low, high = 20000, _ephemeral_low()
    if high < low + 1000:
        high = 32768
    rng = random.Random()
    ports: list[int] = []
    with _HANDED_OUT_LOCK:
        for _ in range(100 * n):
            if len(ports) == n:
                return ports
            port = rng.randrange(low, high)
            if not _bindable(port) or not _reserve(port):
                continue
            ports.append(port)
    if len(ports) == n:
        return ports
    raise RuntimeError(f"found {len(ports)} of {n} free ports in {low}-{high - 1}")


def _bindable(port: int) -> bool:
    """Whether nothing holds ``port`` now, on any address (a server may bind any of them)."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """One free port for a local server (see :func:`free_ports`)."""
    return free_ports(1)[0]


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


def run_demo(*, trials: int | None = None, ask_tell: bool = False, keep: bool = False) -> int:
    """Start ``hpo serve`` (SQLite + local Ray) on a temporary data dir and run the demo study
    end to end; returns an exit code (0 when the study completed with a result)."""
    from hpo.api.client import Client

    spec = dict(ASK_TELL_SPEC if ask_tell else DISPATCH_SPEC)
    if trials:
        spec["budget"] = {**spec["budget"], "max_trials": trials}
    with tempfile.TemporaryDirectory(prefix="hpo-demo-") as tmp, served(Path(tmp)) as (url, tok):
        console.print(f"[bold]hpo demo[/bold]: server at {url} (data in {tmp})")
        console.print(f"dashboard: {url}/#token={tok}")
        client = Client(url, tok)
        study = client.create_study(spec)
        how = (
            "in this process over ask/tell" if ask_tell else "on the local Ray, 2 DDP workers each"
        )
        console.print(
            f"study {study.id} {study.name!r}: TPE + ASHA, {spec['budget']['max_trials']} trials "
            f"{how}"
        )
        started = time.monotonic()
        if ask_tell:
            study.optimize(digits_mlp_objective)
        code = watch(study, poll_s=0.5, report=False)
        _summary(study, time.monotonic() - started, wait_for_test=not ask_tell)
        if keep:
            console.print(f"serving on {url} (token {tok}); Ctrl-C to stop")
            while True:
                time.sleep(3600)
        return code


def _summary(study: Any, elapsed: float, *, wait_for_test: bool) -> None:
    frame = study.trials_dataframe()
    columns = ["number", "state", "value", "attempts", "duration_s"]
    columns += [c for c in frame.columns if c.startswith("params_")]
    print(frame[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    counts = frame["state"].value_counts().to_dict()
    console.print(f"{len(frame)} trials in {elapsed:.0f} s: {counts}")
    best = study.best_trial
    if best is None:
        return
    console.print(f"[bold]best[/bold]: trial {best.number}, value {best.value:.4f}")
    for name, value in best.params.items():
        console.print(f"  {name} = {value}")
    test = wait_for_test_metrics(study, best) if wait_for_test else best.test_metrics
    if test:
        shown = ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in test.items()
        )
        console.print(f"  held-out test metrics: {shown}")
    if best.has_checkpoint:
        console.print(f"  checkpoint: GET /api/v1/studies/{study.id}/best/checkpoint (a .tar.gz)")
