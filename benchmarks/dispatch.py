"""Trial dispatch, side by side: hpo on Ray vs Ray Train vs a plain PyTorch DDP script.

The same training loop (a CNN on the digits images, DDP with 2 gloo workers on CPU) runs
``--trials`` times in a row under each harness:

- **hpo**: a study submitted to ``hpo serve`` (SQLite + local Ray), one trial at a time;
  the loop is registered as a trainable (``HPO_EXTRA_TRAINABLES``) and reports each epoch.
- **Ray Train**: one ``TorchTrainer.fit()`` per trial (Ray Train v2, the documented way),
  reporting each epoch with ``ray.train.report``.
- **plain**: ``torch.multiprocessing.spawn`` of 2 processes per trial, no reporting.

Printed: the gap between one trial's loop ending and the next one's loop starting on the same
resources (process start, imports, rendezvous, scheduling), and training throughput inside
the loop (samples/s over the training phase of each epoch), with ratios against plain PyTorch.

    python benchmarks/dispatch.py                 # 6 trials x 5 epochs per harness
    python benchmarks/dispatch.py --trials 3 --epochs 2 --skip-ray-train
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
BATCH = 32


# --------------------------------------------------------------- the shared training loop


def train_loop(rank: int, world: int, epochs: int, report: Callable[[int, dict], Any]) -> dict:
    """Digits CNN under DDP; returns loop start/end times and per-epoch training seconds."""
    import torch
    import torch.distributed as dist
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    loop_start = time.time()
    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target)
    train = TensorDataset(x[:1400], y[:1400])
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=BATCH, sampler=sampler)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    train_seconds = []
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
        train_seconds.append(time.perf_counter() - t0)
        with torch.no_grad():  # validation on the held-out rest, summed over ranks
            logits = model(x[1400:][rank::world])
            stats = torch.tensor(
                [(logits.argmax(1) == y[1400:][rank::world]).sum().item(), float(len(logits))]
            )
        dist.all_reduce(stats)
        report(epoch, {"val_accuracy": float(stats[0] / stats[1])})
    return {
        "loop_start": loop_start,
        "loop_end": time.time(),
        "train_s": train_seconds,
        "samples": len(train),
    }


# ----------------------------------------------------------------------------- harnesses


def hpo_trainable(ctx: Any) -> None:
    """The loop as an hpo trainable (registered through HPO_EXTRA_TRAINABLES)."""
    out = train_loop(ctx.rank, ctx.world_size, ctx.settings.epochs, ctx.report)
    if ctx.is_main:
        Path(ctx.settings.out).joinpath(f"{ctx.trial_id}.json").write_text(json.dumps(out))


def _hpo_settings() -> Any:
    from pydantic import BaseModel

    class Settings(BaseModel):
        epochs: int = 5
        out: str = ""
        seed: int = 0

    return Settings


hpo_trainable.settings_model = _hpo_settings()  # type: ignore[attr-defined]


def run_hpo(trials: int, epochs: int) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from hpo.api.client import Client
    from hpo.api.demo import served

    with tempfile.TemporaryDirectory(prefix="bench-hpo-") as tmp:
        env = {
            "HPO_EXTRA_TRAINABLES": "bench-loop=benchmarks.dispatch:hpo_trainable",
            "PYTHONPATH": str(ROOT),
            "HPO_RAY_NUM_CPUS": str(WORLD),
            "HPO_SCHEDULER_INTERVAL_S": "0.2",
        }
        with served(Path(tmp), env=env) as (url, token):
            study = Client(url, token).create_study(
                {
                    "name": "bench",
                    "objective": {"metric": "val_accuracy", "direction": "maximize"},
                    "sampler": {"type": "grid"},
                    "budget": {"max_concurrent": 1},
                    "resources": {"workers_per_trial": WORLD, "cpus_per_worker": 1},
                    "trainable": {"name": "bench-loop", "config": {"epochs": epochs, "out": tmp}},
                    "space": {"seed": {"type": "int", "low": 0, "high": trials - 1}},
                }
            )
            study.wait(poll_s=0.5, timeout_s=1800)
            ids = [t.id for t in sorted(study.trials(), key=lambda t: t.number)]
            return [json.loads(Path(tmp, f"{i}.json").read_text()) for i in ids]


def _ray_train_loop(config: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    out = train_loop(
        ctx.get_world_rank(),
        ctx.get_world_size(),
        config["epochs"],
        lambda step, metrics: ray.train.report(metrics),
    )
    if ctx.get_world_rank() == 0:
        Path(config["out"]).joinpath(f"{config['trial']}.json").write_text(json.dumps(out))


def run_ray_train(trials: int, epochs: int) -> list[dict]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(
        address="local",
        num_cpus=WORLD,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-rt-") as tmp:
            for trial in range(trials):
                TorchTrainer(
                    _ray_train_loop,
                    train_loop_config={"epochs": epochs, "out": tmp, "trial": trial},
                    scaling_config=ScalingConfig(num_workers=WORLD, use_gpu=False),
                    run_config=RunConfig(storage_path=tmp, name=f"t{trial}"),
                ).fit()
                results.append(json.loads(Path(tmp, f"{trial}.json").read_text()))
    finally:
        ray.shutdown()
    return results


def _plain_worker(rank: int, world: int, port: int, epochs: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    result = train_loop(rank, world, epochs, lambda step, metrics: None)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def run_plain(trials: int, epochs: int) -> list[dict]:
    import torch.multiprocessing as mp

    from hpo.api.demo import free_port

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-plain-") as tmp:
        for trial in range(trials):
            out = str(Path(tmp, f"{trial}.json"))
            mp.spawn(_plain_worker, args=(WORLD, free_port(), epochs, out), nprocs=WORLD)
            results.append(json.loads(Path(out).read_text()))
    return results


# ------------------------------------------------------------------------------- report


def summarize(runs: list[dict]) -> dict[str, float]:
    gaps = [b["loop_start"] - a["loop_end"] for a, b in itertools.pairwise(runs)]
    rates = [r["samples"] / s for r in runs for s in r["train_s"][1:] or r["train_s"]]
    return {
        "gap_median_s": statistics.median(gaps) if gaps else float("nan"),
        "gap_max_s": max(gaps) if gaps else float("nan"),
        "samples_per_s": statistics.median(rates),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--skip-ray-train", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # two ranks on two cores, every harness

    harnesses: dict[str, Callable[[int, int], list[dict]]] = {
        "plain PyTorch": run_plain,
        "hpo": run_hpo,
    }
    if not args.skip_ray_train:
        harnesses["Ray Train"] = run_ray_train
    table = {}
    for name, run in harnesses.items():
        started = time.perf_counter()
        table[name] = summarize(run(args.trials, args.epochs))
        table[name]["wall_s"] = time.perf_counter() - started
        print(f"{name}: done in {table[name]['wall_s']:.0f} s", flush=True)

    base = table["plain PyTorch"]
    print(f"\n{args.trials} trials x {args.epochs} epochs, DDP world size {WORLD} (gloo, CPU)\n")
    print(
        "| harness | gap between trials (median / max) | train samples/s | vs plain | "
        "wall for all trials |"
    )
    print("|---|---|---|---|---|")
    for name, row in table.items():
        print(
            f"| {name} | {row['gap_median_s']:.2f} s / {row['gap_max_s']:.2f} s | "
            f"{row['samples_per_s']:.0f} | {row['samples_per_s'] / base['samples_per_s']:.2f}x"
            f" | {row['wall_s']:.0f} s |"
        )


if __name__ == "__main__":
    main()
