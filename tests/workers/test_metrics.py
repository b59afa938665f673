"""Classification metrics against scikit-learn's, and gathered over a real 2-rank gloo group."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from hpo.api.demo import free_port
from hpo.workers import metrics, splits
from hpo.workers.context import Objective, TrialContext


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    t = rng.integers(0, k, size=int(rng.integers(5, 80)))
    noise = rng.integers(0, k + 1, size=len(t))  # may predict a class absent from t
    p = np.where(rng.random(len(t)) < 0.6, t, noise)
    ours = metrics.classification_metrics(t.tolist(), p.tolist(), prefix="val_")
    precision, recall, f1, _ = precision_recall_fscore_support(
        t, p, average="macro", zero_division=0
    )
    assert ours["val_accuracy"] == pytest.approx(accuracy_score(t, p), abs=1e-12)
    assert ours["val_precision"] == pytest.approx(precision, abs=1e-12)
    assert ours["val_recall"] == pytest.approx(recall, abs=1e-12)
    assert ours["val_f1"] == pytest.approx(f1, abs=1e-12)


def _rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = TrialContext(
        trial_id=1,
        study_id=1,
        number=0,
        attempt=1,
        params={},
        settings=None,
        rank=rank,
        world_size=2,
        device=torch.device("cpu"),
        objectives=[Objective("val_accuracy", "maximize")],
        trial_dir=Path(out),
    )
    rng = np.random.default_rng(0)  # the same "validation set" on both ranks
    t, p = rng.integers(0, 4, 101), rng.integers(0, 4, 101)
    losses = rng.random(101)
    mine = splits.shard(101, rank, 2)
    gathered = metrics.gathered_metrics(
        ctx, float(losses[mine].sum()), t[mine].tolist(), p[mine].tolist()
    )
    torch.save(gathered, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_gathered_metrics_are_identical_on_every_rank_and_exact(tmp_path: Path) -> None:
    os.environ.pop("MASTER_ADDR", None)
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0 == r1
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 4, 101), rng.integers(0, 4, 101)
    whole = metrics.classification_metrics(t.tolist(), p.tolist(), prefix="val_")
    assert {k: v for k, v in r0.items() if k != "val_loss"} == whole  # every row counted once
    assert r0["val_loss"] == pytest.approx(rng.random(101).mean())
