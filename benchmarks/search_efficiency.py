"""Search efficiency through the service: how much training compute each search strategy spends
to find a good model, measured from the trials' metric streams.

Everything runs through ``hpo serve`` (SQLite + a local Ray, started in a subprocess) and the
Python client, with the built-in trainables:

- **text**: the BERT paper's fine-tuning grid (lr ∈ {5e-5, 3e-5, 2e-5} × batch ∈ {16, 32} ×
  epochs ∈ {2, 3, 4}: 18 trials) against TPE + ASHA over the wider ``text-classification``
  space (lr, batch, epochs, weight decay, warm-up, LR schedule, layer-wise LR decay, dropout,
  clipping, frozen layers), capped at the grid's total compute. MiniLM-L6 on BBC News.
- **digits**: random search against TPE + ASHA on the ``image-classification`` CNN, several
  sampler seeds, each study stopping once a trial completes with ≥ 99 % validation accuracy
  (``--targets``; or at ``--digits-trials``); trials and compute to reach 99 % and 98 %.

Compute accounting: every epoch, each trial reports ``train_samples``, the training rows its
ranks processed so far (a pruned or stopped trial counts the epochs it reported). A study's
compute at time t is the sum over its trials of their last ``train_samples`` reported by t.
A study "reaches" a validation accuracy when a trial *completes* with at least that value (its
checkpoint is then a usable model); its compute at that moment is the compute to reach it.
Test accuracy is the best trial's, on the held-out test split, from the trainable's
``evaluate()`` on the checkpoint downloaded from ``GET /studies/{id}/best/checkpoint``.

    python benchmarks/search_efficiency.py                 # CPU: small subset, 25-45 min
    python benchmarks/search_efficiency.py --only text --text-seeds 3   # 3 TPE seeds, ~30 min
    python benchmarks/search_efficiency.py --only digits --seeds 3
    python benchmarks/search_efficiency.py --full          # GPU-scale settings (full data)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

BERT_GRID = {
    "lr": {"type": "float", "values": [5e-5, 3e-5, 2e-5]},
    "batch_size": {"type": "int", "values": [16, 32]},
    "epochs": {"type": "int", "values": [2, 3, 4]},
}
TEXT_WIDE = {
    "lr": {"type": "float", "low": 1e-5, "high": 5e-4, "log": True},
    "batch_size": {"type": "categorical", "choices": [8, 16, 32]},
    "epochs": {"type": "int", "low": 2, "high": 4},
    "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
    "warmup_frac": {"type": "float", "low": 0.0, "high": 0.2},
    "scheduler": {
        "type": "categorical",
        "choices": ["constant", "linear", "cosine", "step", "exponential", "plateau"],
    },
    "layer_decay": {"type": "float", "low": 0.6, "high": 1.0},
    "dropout": {"type": "float", "low": 0.0, "high": 0.2},
    "max_grad_norm": {"type": "float", "low": 0.3, "high": 5.0, "log": True},
    "freeze_layers": {"type": "int", "low": 0, "high": 3},
}
DIGITS_SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 0.3, "log": True},
    "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
    "optimizer": {"type": "categorical", "choices": ["sgd", "adam", "adamw"]},
    "momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"optimizer": ["sgd"]}},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "scheduler": {"type": "categorical", "choices": ["constant", "cosine", "step", "exponential"]},
    "init": {"type": "categorical", "choices": ["default", "xavier", "he"]},
    "depth": {"type": "int", "low": 1, "high": 4},
    "channels": {"type": "int", "low": 8, "high": 32, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "batch_norm": {"type": "categorical", "choices": [True, False]},
    "shift": {"type": "int", "low": 0, "high": 1},
    "noise": {"type": "float", "low": 0.0, "high": 0.1},
}
OBJECTIVE = {"metric": "val_accuracy", "direction": "maximize"}


# ------------------------------------------------------------------------------ accounting


@dataclass
class Ledger:
    """A study's trials and their ``train_samples`` streams, polled from the service."""

    study: Any
    points: dict[int, list[tuple[datetime, float]]] = field(default_factory=dict)
    trials: dict[int, Any] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)

    def poll(self) -> None:
        for t in self.study.trials():
            self.trials[t.id] = t
            if t.id in self.done:
                continue
            pts = self.study.metrics(t.id, "train_samples")
            self.points[t.id] = sorted((p.time, p.value) for p in pts)
            if t.state not in ("waiting", "running"):
                self.done.add(t.id)

    def compute(self, at: datetime | None = None) -> float:
        """Training samples processed by all trials up to ``at`` (now if None)."""
        total = 0.0
        for pts in self.points.values():
            seen = [v for when, v in pts if at is None or when <= at]
            total += seen[-1] if seen else 0.0
        return total

    def completions(self) -> list[Any]:
        done = [t for t in self.trials.values() if t.state == "complete" and t.value is not None]
        return sorted(done, key=lambda t: t.finished_at)

    def reach(self, target: float) -> tuple[float, int, Any] | None:
        """(compute, trials finished, trial) when a trial first completed with ≥ target."""
        for t in self.completions():
            if t.value >= target - 1e-12:
                finished = sum(
                    1
                    for o in self.trials.values()
                    if o.finished_at and o.finished_at <= t.finished_at
                )
                return self.compute(t.finished_at), finished, t
        return None

    def best(self) -> Any:
        done = self.completions()
        return max(done, key=lambda t: (t.value, -t.finished_at.timestamp())) if done else None

    def counts(self) -> dict[str, int]:
        """Trials per state; ``stopped``: cancelled when the study was stopped (cap/target)."""
        out: dict[str, int] = {}
        for t in self.trials.values():
            state = "stopped" if t.state == "failed" and t.error == "study stopped" else t.state
            out[state] = out.get(state, 0) + 1
        return out

    def records(self) -> list[dict[str, Any]]:
        """One row per trial: number, state, value, compute, params, error (first line)."""
        return [
            {
                "number": t.number,
                "state": t.state,
                "value": t.value,
                "compute": self.points[t.id][-1][1] if self.points.get(t.id) else 0.0,
                "params": t.params,
                "error": (t.error or "").strip().splitlines()[-1:] or None,
            }
            for t in sorted(self.trials.values(), key=lambda t: t.number)
        ]


def run_study(
    client: Any,
    spec: dict,
    *,
    cap: float | None = None,
    stop_at: float | None = None,
    timeout_s: float = 7200,
    label: str = "",
    ledger_type: type[Ledger] = Ledger,
) -> tuple[Ledger, float]:
    """Create ``spec``, poll it until it ends; stop it once its compute reaches ``cap`` or a
    trial completes with ≥ ``stop_at``. Returns its ledger and wall time."""
    study = client.create_study(spec)
    ledger = ledger_type(study)
    started = time.monotonic()
    last_note = 0.0
    while True:
        time.sleep(3)
        ledger.poll()
        state = study.state
        spent = ledger.compute()
        if time.monotonic() - last_note > 60:
            last_note = time.monotonic()
            best = ledger.best()
            print(
                f"  [{label}] {time.monotonic() - started:5.0f} s  {ledger.counts()}  "
                f"compute {spent:,.0f}  best {best.value if best else float('nan'):.4f}",
                flush=True,
            )
        if state in ("completed", "stopped"):
            break
        reached = stop_at is not None and ledger.reach(stop_at) is not None
        if (cap is not None and spent >= cap) or reached or time.monotonic() - started > timeout_s:
            study.stop()
            break
    ledger.poll()
    return ledger, time.monotonic() - started


def test_metrics(client: Any, ledger: Ledger, trainable: str, config: dict) -> dict[str, float]:
    """The best trial's test metrics: its checkpoint downloaded and scored by ``evaluate()``."""
    import torch

    from hpo.workers import registry
    from hpo.workers.inference import load_model

    best = ledger.best()
    if best is None or not best.has_checkpoint:
        return {}
    response = client.request("GET", f"/api/v1/studies/{ledger.study.id}/best/checkpoint")
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        archive = Path(tmp) / "best.tar.gz"
        archive.write_bytes(response.content)
        loaded = load_model(archive)
        fn = registry.load(trainable)
        settings = registry.settings_for(fn, config, best.params)
        return fn.evaluate(loaded.path, settings, torch.device("cpu"))


# ------------------------------------------------------------------------------ the server


def serve(tmp: Path, cpus: int, gpus: int) -> Any:
    from hpo.api.demo import served

    env = {
        "HPO_DATABASE_URL": f"sqlite:///{tmp / 'hpo.db'}",
        "HPO_RAY_NUM_CPUS": str(cpus),
        "HPO_RAY_NUM_GPUS": str(gpus),
        "HPO_SCHEDULER_INTERVAL_S": "0.5",
        "HF_HUB_OFFLINE": "1",
    }
    return served(tmp, env=env)


# ----------------------------------------------------------------------------- the tasks


def text_benchmark(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {"max_length": args.max_length, "log_every": 5}
    if not args.full:
        config |= {"max_train_samples": args.train_samples, "max_eval_samples": args.eval_samples}
    resources = {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": args.gpu}
    base = {
        "objective": OBJECTIVE,
        "resources": resources,
        "trainable": {"name": "text-classification", "config": config},
        "budget": {"max_concurrent": args.concurrent},
    }
    print(f"text: BERT grid, 18 trials, config {config}", flush=True)
    grid_spec = {**base, "name": "bert-grid", "sampler": {"type": "grid"}, "space": BERT_GRID}
    grid, grid_s = run_study(client, grid_spec, label="grid")
    grid_total = grid.compute()
    grid_best = grid.best()
    cap = args.cap_fraction * grid_total
    studies = [("BERT grid", grid, grid_s)]
    for seed in range(args.seed, args.seed + args.text_seeds):
        print(f"text: TPE + ASHA (seed {seed}), capped at {cap:,.0f} samples", flush=True)
        tpe_spec = {
            **base,
            "name": f"tpe-asha-{seed}",
            "sampler": {"type": "tpe", "seed": seed, "n_startup_trials": 6},
            "pruner": {"type": "asha", "min_steps": 1, "reduction_factor": 3},
            "budget": {"max_concurrent": args.concurrent, "max_trials": 200},
            "space": TEXT_WIDE,
        }
        tpe, tpe_s = run_study(client, tpe_spec, cap=cap, label=f"tpe+asha-{seed}")
        studies.append((f"TPE + ASHA (seed {seed})", tpe, tpe_s))
    rows = []
    for name, ledger, wall in studies:
        best = ledger.best()
        reached = ledger.reach(grid_best.value)
        metrics = test_metrics(client, ledger, "text-classification", config)
        rows.append(
            {
                "search": name,
                "trials": len(ledger.trials),
                "states": ledger.counts(),
                "compute": ledger.compute(),
                "wall_s": wall,
                "best_val_accuracy": best.value if best else None,
                "best_params": best.params if best else None,
                "test": metrics,
                "compute_to_grid_best": reached[0] if reached else None,
                "trials_to_grid_best": reached[1] if reached else None,
                "trials_detail": ledger.records(),
            }
        )
    return {"config": config, "grid_total": grid_total, "grid_best": grid_best.value, "rows": rows}


def digits_benchmark(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    config = {"epochs": args.digits_epochs}
    resources = {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}
    runs = []
    for seed in range(args.seeds):
        for name, sampler, pruner in (
            ("random", {"type": "random", "seed": seed}, {"type": "none"}),
            (
                "TPE + ASHA",
                {"type": "tpe", "seed": seed, "n_startup_trials": 6},
                {"type": "asha", "min_steps": 2, "reduction_factor": 3},
            ),
        ):
            spec = {
                "name": f"digits-{name.split()[0].lower()}-{seed}",
                "objective": OBJECTIVE,
                "sampler": sampler,
                "pruner": pruner,
                "budget": {"max_trials": args.digits_trials, "max_concurrent": args.concurrent},
                "resources": resources,
                "trainable": {"name": "image-classification", "config": config},
                "space": DIGITS_SPACE,
            }
            top = max(args.targets)
            ledger, wall = run_study(client, spec, stop_at=top, label=spec["name"])
            best = ledger.best()
            runs.append(
                {
                    "search": name,
                    "seed": seed,
                    "trials": len(ledger.trials),
                    "states": ledger.counts(),
                    "compute": ledger.compute(),
                    "wall_s": wall,
                    "best_val_accuracy": best.value if best else None,
                    "reach": {
                        str(t): ledger.reach(t)[:2] if ledger.reach(t) else None
                        for t in args.targets
                    },
                    "test": test_metrics(client, ledger, "image-classification", config),
                }
            )
            print(f"  {json.dumps(runs[-1], default=str)}", flush=True)
            runs[-1]["trials_detail"] = ledger.records()
    return {"config": config, "targets": args.targets, "runs": runs}


# ------------------------------------------------------------------------------- reporting


def _f(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def text_table(result: dict[str, Any]) -> str:
    total = result["grid_total"]
    lines = [
        f"grid total compute: {total:,.0f} training samples; grid best val accuracy "
        f"{result['grid_best']:.4f}",
        "",
        "| search | trials (states) | compute (samples) | best val acc | test acc | test F1 "
        "| compute to grid's best | % of grid compute | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        reach = r["compute_to_grid_best"]
        share = "-" if reach is None else f"{100 * reach / total:.0f} %"
        states = ", ".join(f"{k} {v}" for k, v in sorted(r["states"].items()))
        lines.append(
            f"| {r['search']} | {r['trials']} ({states}) | {r['compute']:,.0f} "
            f"| {_f(r['best_val_accuracy'])} | {_f(r['test'].get('test_accuracy'))} "
            f"| {_f(r['test'].get('test_f1'))} "
            f"| {'not reached' if reach is None else f'{reach:,.0f}'} | {share} "
            f"| {r['wall_s'] / 60:.1f} min |"
        )
    for r in result["rows"]:
        lines.append(f"\n{r['search']} best params: {json.dumps(r['best_params'])}")
    return "\n".join(lines)


def digits_table(result: dict[str, Any]) -> str:
    targets = result["targets"]
    head = "".join(f" trials, compute to ≥ {t:.0%} |" for t in targets)
    lines = [
        f"| search | seed | trials run (states) |{head} best val acc | test acc | compute run |",
        "|---|---|---|" + "---|" * len(targets) + "---|---|---|",
    ]
    for r in result["runs"]:
        states = ", ".join(f"{k} {v}" for k, v in sorted(r["states"].items()))
        cells = ""
        for t in targets:
            hit = r["reach"][str(t)]
            cells += " not reached |" if hit is None else f" {hit[1]}, {hit[0]:,.0f} |"
        lines.append(
            f"| {r['search']} | {r['seed']} | {r['trials']} ({states}) |{cells} "
            f"{_f(r['best_val_accuracy'])} | {_f(r['test'].get('test_accuracy'))} "
            f"| {r['compute']:,.0f} |"
        )
    lines.append("")
    for name in ("random", "TPE + ASHA"):
        mine = [r for r in result["runs"] if r["search"] == name]
        parts = []
        for t in targets:
            hit = [r["reach"][str(t)] for r in mine if r["reach"][str(t)] is not None]
            part = f"≥ {t:.0%} in {len(hit)} of {len(mine)} seeds"
            if hit:
                mean_t = sum(h[1] for h in hit) / len(hit)
                mean_c = sum(h[0] for h in hit) / len(hit)
                part += f" (mean {mean_t:.1f} trials, {mean_c:,.0f} samples)"
            parts.append(part)
        lines.append(f"- {name}: " + "; ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["text", "digits"])
    parser.add_argument("--full", action="store_true", help="GPU-scale settings (full data)")
    parser.add_argument("--seed", type=int, default=0, help="text: first TPE seed")
    parser.add_argument("--text-seeds", type=int, default=1, help="text: TPE + ASHA studies")
    parser.add_argument("--seeds", type=int, default=None, help="digits: sampler seeds")
    parser.add_argument("--train-samples", type=int, default=200)
    parser.add_argument("--eval-samples", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--cap-fraction", type=float, default=1.0)
    parser.add_argument(
        "--targets", default="0.99,0.98", help="digits: val accuracies to reach (stop at max)"
    )
    parser.add_argument("--digits-trials", type=int, default=None)
    parser.add_argument("--digits-epochs", type=int, default=None)
    parser.add_argument("--gpus", type=int, default=1, help="--full: GPUs on this machine")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so that hpo serve and its local Ray are shut down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.gpu = 1 if args.full else 0
    args.concurrent = args.gpus if args.full else 2
    args.max_length = args.max_length or (256 if args.full else 64)
    args.targets = sorted((float(t) for t in args.targets.split(",")), reverse=True)
    args.seeds = args.seeds or (10 if args.full else 5)
    args.digits_trials = args.digits_trials or (60 if args.full else 40)
    args.digits_epochs = args.digits_epochs or (20 if args.full else 12)
    cpus = 2 * args.gpus if args.full else 2

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    started = time.monotonic()
    gpus = args.gpus if args.full else 0
    with (
        tempfile.TemporaryDirectory(prefix="bench-search-") as tmp,
        serve(Path(tmp), cpus, gpus) as (url, token),
    ):
        from hpo.api.client import Client

        client = Client(url, token)
        if args.only in (None, "text"):
            results["text"] = text_benchmark(client, args)
            print("\n## text-classification: BERT grid vs TPE + ASHA\n", flush=True)
            print(text_table(results["text"]), flush=True)
        if args.only in (None, "digits"):
            results["digits"] = digits_benchmark(client, args)
            print("\n## image-classification: random vs TPE + ASHA\n", flush=True)
            print(digits_table(results["digits"]), flush=True)
    results["wall_s"] = time.monotonic() - started
    print(f"\ntotal wall time {results['wall_s'] / 60:.1f} min", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
