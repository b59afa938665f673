"""Schedulers on real training, side by side at equal compute: hpo's random search, stopping
ASHA, promotion ASHA, Hyperband, BOHB and PBT, and Ray Tune's own ASHAScheduler and
PopulationBasedTraining driving the same digits CNN (the ``image-classification`` trainable's
model, data split, optimizer and augmentation), in the same run.

Every search trains SGD with momentum on the same space for ``--epochs`` epochs a trial and
stops once it has trained ``--cap`` epochs in all (hpo: ``budget.max_steps``; Ray Tune: a
stopper counting every reported epoch). PBT runs a population of ``cap / epochs`` trials and
perturbs ``lr``, ``momentum`` and ``weight_decay`` every ``--interval`` epochs. Per run:

- **to target**: wall seconds and epochs (compute) until some trial first reports
  ``val_accuracy >= --target`` (its checkpoint of that epoch is a usable model);
- **compute**: epochs trained in all (each reported epoch of every trial; a PBT copy that
  trains an epoch again counts it again);
- **to random's best**: epochs trained until some trial first reached the best validation
  accuracy hpo's random search reached with the same seed, and that as a fraction of all the
  epochs random search trained (the issue's target for promotion ASHA: <= 1/3);
- **best val** / **test**: the best trial's validation accuracy and its test-split accuracy
  (hpo: the best checkpoint downloaded and scored by the trainable's ``evaluate``; Ray Tune:
  the best trial's last checkpoint scored the same way).

    python benchmarks/schedulers.py                      # 1 seed, cap 72 epochs: ~15 min here
    python benchmarks/schedulers.py --seeds 5 --json /tmp/schedulers.json
    python benchmarks/schedulers.py --only hpo           # or --only tune
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_efficiency import Ledger, run_study, serve, test_metrics

SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True, "mutable": True},
    "momentum": {"type": "float", "low": 0.5, "high": 0.99, "mutable": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True, "mutable": True},
    "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
    "channels": {"type": "int", "low": 8, "high": 32, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
}
CONFIG = {"optimizer": "sgd", "scheduler": "constant"}
MUTABLE = [name for name, p in SPACE.items() if p.get("mutable")]
OBJECTIVE = {"metric": "val_accuracy", "direction": "maximize"}


class CurveLedger(Ledger):
    """A study's trials with their ``val_accuracy`` streams (time, step, value)."""

    def __init__(self, study: Any) -> None:
        super().__init__(study)
        self.curves: dict[int, list[tuple[datetime, int, float]]] = {}

    def poll(self) -> None:
        super().poll()
        for t in self.trials.values():  # every trial, every time: a copy may rewrite steps
            self.curves[t.id] = [
                (p.time, p.step, p.value) for p in self.study.metrics(t.id, "val_accuracy")
            ]

    def epochs(self) -> int:
        return sum(len(c) for c in self.curves.values())

    def to_target(self, target: float, started: datetime) -> tuple[float, int] | None:
        """Seconds from ``started`` and epochs trained until a trial first reached target."""
        hits = [when for c in self.curves.values() for when, _, v in c if v >= target]
        if not hits:
            return None
        first = min(hits)
        spent = sum(1 for c in self.curves.values() for when, _, _ in c if when <= first)
        return (first - started).total_seconds(), spent


# ----------------------------------------------------------------------------- hpo


def hpo_specs(seed: int, args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    eta, epochs = 3, args.epochs
    asha = {"type": "asha", "min_steps": 1, "reduction_factor": eta, "max_steps": epochs}
    plain = {k: {kk: vv for kk, vv in p.items() if kk != "mutable"} for k, p in SPACE.items()}
    random = {"type": "random", "seed": seed}
    runs = [
        ("random", {"sampler": random}),
        ("asha", {"sampler": random, "pruner": asha}),
        ("asha-promotion", {"sampler": random, "pruner": {**asha, "mode": "promotion"}}),
        ("hyperband", {"sampler": random, "pruner": {**asha, "type": "hyperband"}}),
        (
            "bohb",
            {"sampler": {"type": "bohb", "seed": seed, "n_startup_trials": 6}, "pruner": asha},
        ),
        (
            "pbt",
            {
                "sampler": random,
                "scheduler": {
                    "type": "pbt",
                    "population": args.cap // epochs,
                    "interval_steps": args.interval,
                    "max_steps": epochs,
                },
                "space": SPACE,
            },
        ),
    ]
    out = []
    for name, over in runs:
        spec = {
            "name": f"sched-{name}-{seed}",
            "objective": OBJECTIVE,
            "space": plain,
            "budget": {"max_steps": args.cap, "max_concurrent": args.concurrent},
            "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
            "trainable": {
                "name": "image-classification",
                "config": {**CONFIG, "epochs": epochs, "seed": seed},
            },
            **over,
        }
        if name != "pbt":
            spec["budget"]["max_trials"] = 200
        out.append((name, spec))
    return out


def run_hpo(args: argparse.Namespace) -> list[dict[str, Any]]:
    from hpo.api.client import Client

    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-sched-") as tmp,
        serve(Path(tmp), cpus=args.concurrent, gpus=0) as (url, token),
    ):
        client = Client(url, token)
        random_best: dict[int, tuple[float, int]] = {}  # seed: random search's (best, compute)
        for seed in range(args.seeds):
            for name, spec in hpo_specs(seed, args):
                if args.schedulers and name not in args.schedulers:
                    continue
                started = datetime.now().astimezone()
                ledger, wall = run_study(client, spec, label=spec["name"], ledger_type=CurveLedger)
                assert isinstance(ledger, CurveLedger)
                best = ledger.best()
                config = {**CONFIG, "epochs": args.epochs, "seed": seed}
                test = test_metrics(client, ledger, "image-classification", config)
                reach = ledger.to_target(args.target, started)
                if name == "random" and best is not None:
                    random_best[seed] = (best.value, ledger.epochs())
                reach_random = (
                    ledger.to_target(random_best[seed][0], started) if seed in random_best else None
                )
                rows.append(
                    {
                        "search": f"hpo {name}",
                        "seed": seed,
                        "wall_s": wall,
                        "trials": len(ledger.trials),
                        "copies": sum(
                            1 for t in ledger.trials.values() for s in t.schedule or [] if s.parent
                        ),
                        "compute": ledger.epochs(),
                        "to_target_s": reach[0] if reach else None,
                        "to_target_epochs": reach[1] if reach else None,
                        "to_random_best_epochs": reach_random[1] if reach_random else None,
                        "random_compute": random_best[seed][1] if seed in random_best else None,
                        "best_val": best.value if best else None,
                        "test_accuracy": test.get("test_accuracy"),
                        "resume_s": resume_gaps(client, ledger),
                    }
                )
                if args.replay and name == "pbt":
                    rows[-1]["replays"] = replay_all(ledger)
                print(f"  {json.dumps(rows[-1])}", flush=True)
    return rows


def replay_all(ledger: Ledger) -> list[dict[str, Any]]:
    """Train every complete trial of the PBT study again along its lineage (``hpo replay``,
    one at a time): each one's value, the replay's, and the segments its lineage holds."""
    out = []
    for trial in ledger.completions():
        spec = ledger.study.replay_spec(trial.id, name=f"{ledger.study.name}-replay-{trial.number}")
        again = ledger.study.client.create_study(spec)
        again.wait(timeout_s=600)
        (replayed,) = again.trials()
        segments = spec.replay.schedule if spec.replay else []
        out.append(
            {
                "number": trial.number,
                "value": trial.value,
                "replayed": replayed.value,
                "state": replayed.state,
                "segments": len(segments),
                "trials_in_lineage": len({s.trial_number for s in segments}),
            }
        )
    return out


def pause_gaps(client: Any, trial_id: int) -> list[float]:
    """Seconds from each pause of the trial (its attempt saved its checkpoint and ended) to
    its next attempt running (claimed and launched on warm workers)."""
    gaps, paused_at = [], None
    for event in client.trial(trial_id).events or []:
        if event.state == "paused":
            paused_at = event.time
        elif event.state == "running" and paused_at is not None:
            gaps.append((event.time - paused_at).total_seconds())
            paused_at = None
    return gaps


def resume_gaps(client: Any, ledger: Ledger) -> float | None:
    """The median of :func:`pause_gaps` over the study's trials."""
    gaps = [gap for t in ledger.trials.values() for gap in pause_gaps(client, t.id)]
    return statistics.median(gaps) if gaps else None


# ------------------------------------------------------------------------------ Ray Tune


def tune_trainable(config: dict[str, Any]) -> None:
    """The digits CNN as a Ray Tune function trainable: the same model, split, optimizer and
    augmentation as hpo's ``image-classification``; checkpoints every epoch (PBT restores them
    and then trains with its perturbed config)."""
    import torch
    from ray import tune
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from hpo.workers.trainables import image_classification as ic

    torch.set_num_threads(1)
    s = ic.Settings(**config)
    torch.manual_seed(s.seed)
    train_set, val_set, _ = ic.datasets(s)
    loader = DataLoader(train_set, s.batch_size, shuffle=True)
    val_loader = DataLoader(val_set, 512)
    model = ic.build_model(s)
    ic.init_weights(model, s.init)
    optimizer = ic.make_optimizer(s, model.parameters())
    start, seen = 1, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # PBT's perturbed values, not the copied ones
            group.update(lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        start, seen = state["epoch"] + 1, state["train_samples"]
    for epoch in range(start, s.epochs + 1):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(ic.augment(x, s)), y).backward()
            optimizer.step()
            seen += len(y)
        _, y_true, y_pred = ic.predict_loader(model, val_loader, torch.device("cpu"))
        accuracy = sum(a == b for a, b in zip(y_true, y_pred, strict=True)) / len(y_true)
        with tempfile.TemporaryDirectory() as folder:
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch, "train_samples": seen},
                Path(folder) / "state.pt",
            )  # fmt: skip
            tune.report(
                {"val_accuracy": accuracy, "train_samples": seen, "epoch": epoch},
                checkpoint=tune.Checkpoint.from_directory(folder),
            )


def tune_test_accuracy(result: Any, config: dict[str, Any]) -> float | None:
    import torch
    from torch.utils.data import DataLoader

    from hpo.workers.trainables import image_classification as ic

    if result.checkpoint is None:
        return None
    s = ic.Settings(**config)
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", weights_only=False)
    model = ic.build_model(s)
    model.load_state_dict(state["model"])
    _, y_true, y_pred = ic.predict_loader(model, DataLoader(ic.datasets(s)[2], 512), "cpu")
    return sum(a == b for a, b in zip(y_true, y_pred, strict=True)) / len(y_true)


def run_tune(args: argparse.Namespace) -> list[dict[str, Any]]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    class Cap(tune.Stopper):
        """Ends the experiment once ``cap`` epochs were reported in all (equal compute)."""

        def __init__(self, cap: int) -> None:
            self.cap, self.seen = cap, 0

        def __call__(self, trial_id: str, result: dict) -> bool:
            self.seen += 1
            return False

        def stop_all(self) -> bool:
            return self.seen >= self.cap

    search = {
        "lr": tune.loguniform(1e-3, 0.5),
        "momentum": tune.uniform(0.5, 0.99),
        "weight_decay": tune.loguniform(1e-6, 1e-2),
        "batch_size": tune.choice([32, 64, 128]),
        "channels": tune.lograndint(8, 33),
        "dropout": tune.uniform(0.0, 0.5),
    }
    rows = []
    ray.init(num_cpus=args.concurrent, include_dashboard=False, log_to_driver=False)
    try:
        for seed in range(args.seeds):
            fixed = {**CONFIG, "epochs": args.epochs, "seed": seed}
            for name in ("asha", "pbt"):
                if args.schedulers and f"tune-{name}" not in args.schedulers:
                    continue
                if name == "asha":
                    scheduler: Any = ASHAScheduler(
                        time_attr="epoch", max_t=args.epochs, grace_period=1, reduction_factor=3
                    )
                    samples = 200
                else:
                    scheduler = PopulationBasedTraining(
                        time_attr="epoch",
                        perturbation_interval=args.interval,
                        hyperparam_mutations={
                            k: search[k] for k in ("lr", "momentum", "weight_decay")
                        },
                        quantile_fraction=0.25,
                        resample_probability=0.25,
                    )
                    samples = args.cap // args.epochs
                tuner = tune.Tuner(
                    tune.with_resources(tune_trainable, {"cpu": 1}),
                    param_space={**search, **fixed},
                    tune_config=tune.TuneConfig(
                        metric="val_accuracy",
                        mode="max",
                        scheduler=scheduler,
                        num_samples=samples,
                        max_concurrent_trials=args.concurrent,
                        search_alg=tune.search.BasicVariantGenerator(random_state=seed),
                    ),
                    run_config=tune.RunConfig(
                        stop=Cap(args.cap),
                        storage_path=tempfile.mkdtemp(prefix="bench-tune-"),
                        verbose=0,
                    ),
                )
                started = time.time()
                grid = tuner.fit()
                wall = time.time() - started
                frames = [  # the trials that reported (the cap stops the others unstarted)
                    f
                    for r in grid
                    if (f := r.metrics_dataframe) is not None and "val_accuracy" in f.columns
                ]
                points = sorted(
                    (float(t), float(v))
                    for f in frames
                    for t, v in zip(f["timestamp"], f["val_accuracy"], strict=True)
                )
                hit = next((i for i, (_, v) in enumerate(points) if v >= args.target), None)
                best = grid.get_best_result(metric="val_accuracy", mode="max", scope="last")
                rows.append(
                    {
                        "search": f"ray tune {name}",
                        "seed": seed,
                        "wall_s": wall,
                        "trials": len(frames),
                        "compute": len(points),
                        "to_target_s": points[hit][0] - started if hit is not None else None,
                        "to_target_epochs": hit + 1 if hit is not None else None,
                        "best_val": best.metrics.get("val_accuracy"),
                        "test_accuracy": tune_test_accuracy(best, {**fixed, **best.config}),
                    }
                )
                print(f"  {json.dumps(rows[-1])}", flush=True)
    finally:
        ray.shutdown()
    return rows


# ----------------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]], target: float) -> str:
    def med(values: list[float | None]) -> str:
        known = [v for v in values if v is not None]
        return f"{statistics.median(known):.4g}" if known else "—"

    def of_random(r: dict[str, Any]) -> float | None:
        """Epochs to random search's best over random search's epochs (never: infinite)."""
        if not r.get("random_compute"):
            return None
        got = r.get("to_random_best_epochs")
        return math.inf if got is None else got / r["random_compute"]

    lines = [
        f"| search | runs | reached {target} | to target (s) | to target (epochs) | compute "
        "(epochs) | to random's best (epochs) | ÷ random's compute | best val | test |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for search in dict.fromkeys(r["search"] for r in rows):
        mine = [r for r in rows if r["search"] == search]
        reached = sum(r["to_target_s"] is not None for r in mine)
        lines.append(
            f"| {search} | {len(mine)} | {reached}/{len(mine)} "
            f"| {med([r['to_target_s'] for r in mine])} "
            f"| {med([r['to_target_epochs'] for r in mine])} "
            f"| {med([r['compute'] for r in mine])} "
            f"| {med([r.get('to_random_best_epochs') for r in mine])} "
            f"| {med([of_random(r) for r in mine])} | {med([r['best_val'] for r in mine])} "
            f"| {med([r['test_accuracy'] for r in mine])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--epochs", type=int, default=9, help="epochs of a full trial")
    p.add_argument("--cap", type=int, default=72, help="epochs trained in all, per run")
    p.add_argument("--interval", type=int, default=2, help="PBT: epochs between exploits")
    p.add_argument("--concurrent", type=int, default=2, help="trials at once (CPUs)")
    p.add_argument("--target", type=float, default=0.98)
    p.add_argument("--only", choices=["hpo", "tune"])
    p.add_argument("--schedulers", nargs="*", help="e.g. asha pbt tune-asha")
    p.add_argument(
        "--replay",
        action="store_true",
        help="hpo pbt: train each run's best trial again (hpo replay)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = []
    if args.only != "tune":
        rows += run_hpo(args)
    if args.only != "hpo":
        rows += run_tune(args)
    print(table(rows, args.target))
    replays = [(r["seed"], p) for r in rows for p in r.get("replays", [])]
    if replays:
        same = sum(p["replayed"] == p["value"] for _, p in replays)
        copied = [p for _, p in replays if p["trials_in_lineage"] > 1]
        print(
            f"hpo replay of every complete PBT trial: {same} of {len(replays)} reproduced "
            f"exactly ({sum(p['replayed'] == p['value'] for p in copied)} of {len(copied)} "
            "whose lineage crosses trials)"
        )
        for seed, p in replays:
            if p["replayed"] != p["value"]:
                print(f"  seed {seed} trial {p['number']}: {p['value']} -> {p['replayed']}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "rows": rows}, default=str, indent=1))


if __name__ == "__main__":
    main()
