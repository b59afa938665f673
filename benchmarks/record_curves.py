"""Record learning curves of the ``image-classification`` trainable for the simulated-time
scheduler benchmark (``benchmarks/simulate.py``).

Each of ``--configs`` random configurations (the search space below, drawn with ``--seed``) is
trained for ``--epochs`` epochs in this process (the file is rewritten after each, so
stopping the recorder early keeps what it has), one thread, no control plane: the trainable's
own ``train(ctx)`` with a context whose ``report`` records, per epoch, the validation accuracy
and loss and the CPU seconds the epoch took (training + validation + checkpoint; CPU time of the
one thread, so that other work on the machine does not inflate it). Diverging
configurations are kept: their curve ends at the epoch that failed (accuracy 0.1 after it, the
chance level, as a scheduler would see a dead trial). The result is one gzipped JSON file:

    {"trainable": ..., "epochs": E, "space": {...}, "machine": "...",
     "curves": [{"config": {...}, "val_accuracy": [...], "val_loss": [...], "seconds": [...]}]}

    python benchmarks/record_curves.py                         # 120 configs x 9 epochs
    python benchmarks/record_curves.py --configs 20 --epochs 3 --out /tmp/curves.json.gz
    python benchmarks/record_curves.py --merge a.json.gz b.json.gz --out both.json.gz
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hpo.workers import TrainableError, registry
from hpo.workers.context import Objective, TrialContext
from hpo.workers.trainables import image_classification

OUT = Path(__file__).resolve().parent / "data" / "digits_curves.json.gz"
TRAINABLE = "image-classification"
CHANCE = 0.1  # ten digits


def sample_config(rng: random.Random) -> dict[str, Any]:
    """One random configuration of the CNN (log-uniform learning rate)."""
    optimizer = rng.choice(["sgd", "adam", "adamw"])
    low, high = (1e-3, 1.0) if optimizer == "sgd" else (1e-4, 3e-2)
    return {
        "optimizer": optimizer,
        "lr": round(math.exp(rng.uniform(math.log(low), math.log(high))), 6),
        "batch_size": rng.choice([32, 64, 128, 256]),
        "depth": rng.randint(1, 4),
        "channels": rng.choice([4, 8, 16]),
        "hidden": rng.choice([16, 32, 64, 128]),
        "dropout": round(rng.uniform(0.0, 0.5), 3),
        "batch_norm": rng.random() < 0.5,
        "init": rng.choice(["default", "xavier", "he"]),
        "scheduler": rng.choice(["constant", "cosine", "step"]),
        "weight_decay": round(10 ** rng.uniform(-6, -2), 8),
        "shift": rng.choice([0, 0, 1]),
        "noise": rng.choice([0.0, 0.0, 0.1]),
    }


def record(config: dict[str, Any], epochs: int, tmp: Path) -> dict[str, Any]:
    """Train ``config`` for ``epochs`` epochs; its per-epoch curve and timings."""
    fn = registry.load(TRAINABLE)
    ctx = TrialContext(
        trial_id=1,
        study_id=1,
        number=0,
        attempt=1,
        params={},
        settings=registry.settings_for(fn, {**config, "epochs": epochs}, {}),
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        objectives=[Objective("val_accuracy", "maximize")],
        trial_dir=tmp,
        trainable=TRAINABLE,
        keep_checkpoints=1,
    )
    curve: dict[str, list[float | None]] = {"val_accuracy": [], "val_loss": [], "seconds": []}
    report = ctx.report
    started = [time.process_time()]

    def recording(step: int, metrics: Any, checkpoint: Any = None) -> bool:
        stop = report(step, metrics, checkpoint)
        now = time.process_time()
        curve["val_accuracy"].append(round(float(metrics["val_accuracy"]), 5))
        curve["val_loss"].append(round(float(metrics["val_loss"]), 5))
        curve["seconds"].append(round(now - started[0], 4))
        started[0] = now
        return stop

    ctx.report = recording  # type: ignore[method-assign]
    with contextlib.suppress(TrainableError):  # diverged: a dead trial from here on
        fn(ctx)
    while len(curve["val_accuracy"]) < epochs:
        spent = curve["seconds"][-1] if curve["seconds"] else 0.1
        curve["val_accuracy"].append(CHANCE)
        curve["val_loss"].append(None)
        curve["seconds"].append(spent)
    return {"config": config, **curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--merge", type=Path, nargs="+", help="join recorded files into --out")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(1)
    image_classification.load_digits()  # cached: not in the first curve's first epoch
    rng = random.Random(args.seed)
    curves: list[dict[str, Any]] = []
    started = time.process_time()
    with tempfile.TemporaryDirectory(prefix="hpo-curves-") as tmp:
        for i in range(args.configs):
            config = sample_config(rng)
            curves.append(record(config, args.epochs, Path(tmp) / f"trial-{i}"))
            best = max(curves[-1]["val_accuracy"])
            print(f"{i + 1}/{args.configs} best {best:.3f} {sum(curves[-1]['seconds']):.1f}s")
            save(args, curves, time.process_time() - started)  # stop any time: kept so far


def save(args: argparse.Namespace, curves: list[dict[str, Any]], cpu_s: float) -> None:
    data = {
        "trainable": TRAINABLE,
        "epochs": args.epochs,
        "seed": args.seed,
        "machine": f"{platform.machine()}, 1 thread",
        "recorded_cpu_s": round(cpu_s, 1),
        "curves": curves,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    with gzip.open(partial, "wt") as f:
        json.dump(data, f, separators=(",", ":"))
    partial.replace(args.out)


def merge(paths: list[Path], out: Path) -> None:
    """One file with the curves of several recordings (same trainable and epochs)."""
    found = []
    for path in paths:
        with gzip.open(path, "rt") as f:
            found.append(json.load(f))
    if len({(d["trainable"], d["epochs"]) for d in found}) != 1:
        raise SystemExit("--merge: the files differ in trainable or epochs")
    data = {**found[0], "seed": [d["seed"] for d in found]}
    data["recorded_cpu_s"] = round(sum(d["recorded_cpu_s"] for d in found), 1)
    data["curves"] = [c for d in found for c in d["curves"]]
    with gzip.open(out, "wt") as f:
        json.dump(data, f, separators=(",", ":"))
    print(f"wrote {out}: {len(data['curves'])} curves ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
