"""The shared data helpers: cleaning, splits, k-fold, metrics (against scikit-learn's), LR
schedules, the loss guard, early stopping, and metrics gathered over a real 2-rank gloo group."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from hpo.api.demo import free_port
from hpo.workers import TrainableError, data
from hpo.workers.context import Objective, TrialContext

# ------------------------------------------------------------------------------- cleaning


def test_clean_texts_drops_and_counts_duplicates_empty_and_over_long_rows() -> None:
    texts = [
        "Shares rose on Monday.",
        "shares  rose on MONDAY. ",  # a duplicate up to case and whitespace
        "",
        "   \n",
        None,
        "x" * 50,  # over-long
        "The striker scored twice.",
        "The striker scored twice.",  # a duplicate with another label
        "Parliament votes today.",
        "Unknown topic here.",
    ]
    labels = ["biz", "biz", "biz", "sport", "biz", "sport", "sport", "biz", "politics", "weather"]
    keep, report = data.clean_texts(
        texts, labels, max_chars=40, known_labels={"biz", "sport", "politics"}
    )
    assert keep.tolist() == [0, 6, 8]  # the first copy of each duplicate is kept
    assert report.rows == 10 and report.kept == 3 and report.removed == 7
    assert (report.duplicates, report.conflicting) == (2, 1)
    assert (report.empty, report.too_long, report.unknown_label) == (3, 1, 1)
    assert report.as_metrics()["data_duplicates"] == 2.0
    assert str(report) == (
        "kept 3 of 10 rows (removed: duplicates 2, conflicting 1, empty 3, too_long 1, "
        "unknown_label 1)"
    )


def test_clean_arrays_drops_identical_blank_and_non_finite_images() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((6, 8, 8))
    x[2] = x[0]  # duplicate
    x[3] = 0.0  # blank
    x[4, 1, 1] = np.nan  # broken
    y = np.array([1, 2, 1, 3, 4, 5])
    keep, report = data.clean_arrays(x, y)
    assert keep.tolist() == [0, 1, 5]
    assert (report.duplicates, report.empty, report.kept) == (1, 2, 3)


# --------------------------------------------------------------------------------- splits


def _labels(n: int = 500) -> np.ndarray:
    return np.random.default_rng(1).choice(5, size=n, p=[0.4, 0.3, 0.15, 0.1, 0.05])


def test_split_is_fixed_by_its_seed_disjoint_complete_and_stratified() -> None:
    y = _labels()
    a = data.split(y, val_fraction=0.2, test_fraction=0.1, seed=7)
    b = data.split(y, val_fraction=0.2, test_fraction=0.1, seed=7)
    c = data.split(y, val_fraction=0.2, test_fraction=0.1, seed=8)
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(a, part), getattr(b, part))
    assert not np.array_equal(a.test, c.test)
    assert (len(a.train), len(a.val), len(a.test)) == (350, 100, 50)
    assert not set(a.train) & set(a.val) and not set(a.train) & set(a.test)
    assert not set(a.val) & set(a.test)
    assert sorted([*a.train, *a.val, *a.test]) == list(range(len(y)))
    overall = np.bincount(y, minlength=5) / len(y)
    for part in (a.train, a.val, a.test):
        share = np.bincount(y[part], minlength=5) / len(part)
        assert np.abs(share - overall).max() < 0.03


def test_k_fold_keeps_the_test_set_and_covers_the_rest_once() -> None:
    y = _labels()
    plain = data.split(y, val_fraction=0.2, test_fraction=0.1, seed=3)
    folds = [
        data.split(y, val_fraction=0.2, test_fraction=0.1, seed=3, folds=4, fold=k)
        for k in range(4)
    ]
    for f in folds:
        assert np.array_equal(f.test, plain.test)  # the test set ignores folds
        assert not set(f.train) & set(f.val)
        assert len(f.train) + len(f.val) + len(f.test) == len(y)
    vals = np.concatenate([f.val for f in folds])
    assert sorted(vals) == sorted(set(range(len(y))) - set(plain.test))  # each row once
    first = np.bincount(y[folds[0].val], minlength=5) / len(folds[0].val)
    assert np.abs(first - np.bincount(y, minlength=5) / len(y)).max() < 0.03
    with pytest.raises(ValueError, match="fold must lie in"):
        data.split(y, val_fraction=0.2, test_fraction=0.1, seed=3, folds=4, fold=4)


def test_subsample_is_stratified_and_fixed() -> None:
    y = _labels(1000)
    idx = np.arange(1000)
    a = data.subsample(idx, y, 200, seed=0)
    assert np.array_equal(a, data.subsample(idx, y, 200, seed=0)) and len(a) == 200
    assert np.abs(np.bincount(y[a], minlength=5) / 200 - np.bincount(y) / 1000).max() < 0.01
    assert data.subsample(idx, y, None, seed=0) is idx
    assert data.shard(7, 0, 2) == [0, 2, 4, 6] and data.shard(7, 1, 2) == [1, 3, 5]


# -------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    t = rng.integers(0, k, size=int(rng.integers(5, 80)))
    noise = rng.integers(0, k + 1, size=len(t))  # may predict a class absent from t
    p = np.where(rng.random(len(t)) < 0.6, t, noise)
    ours = data.classification_metrics(t.tolist(), p.tolist(), prefix="val_")
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
        checkpoint_dir=Path(out),
    )
    rng = np.random.default_rng(0)  # the same "validation set" on both ranks
    t, p = rng.integers(0, 4, 101), rng.integers(0, 4, 101)
    losses = rng.random(101)
    mine = data.shard(101, rank, 2)
    metrics = data.gathered_metrics(
        ctx, float(losses[mine].sum()), t[mine].tolist(), p[mine].tolist()
    )
    torch.save(metrics, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_gathered_metrics_are_identical_on_every_rank_and_exact(tmp_path: Path) -> None:
    os.environ.pop("MASTER_ADDR", None)
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0 == r1
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 4, 101), rng.integers(0, 4, 101)
    whole = data.classification_metrics(t.tolist(), p.tolist(), prefix="val_")
    assert {k: v for k, v in r0.items() if k != "val_loss"} == whole  # every row counted once
    assert r0["val_loss"] == pytest.approx(rng.random(101).mean())


# ------------------------------------------------------------------------------- training


class _Opt:
    def __init__(self, *lrs: float) -> None:
        self.param_groups = [{"lr": lr} for lr in lrs]


def _trace(kind: str, **kw: object) -> list[float]:
    opt = _Opt(1.0)
    s = data.Schedule(opt, kind, total_steps=20, steps_per_epoch=5, **kw)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(19):
        s.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_schedules_have_their_shapes() -> None:
    assert _trace("constant") == [1.0] * 20
    linear = _trace("linear", warmup_fraction=0.2)
    assert linear[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # warm-up: 4 steps
    assert linear[4] == 1.0 and linear[-1] == pytest.approx(1 / 16)
    assert all(a >= b for a, b in itertools.pairwise(linear[4:]))
    cosine = _trace("cosine")
    assert cosine[0] == 1.0 and cosine[10] == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    step = _trace("step", gamma=0.1, step_epochs=2)
    assert step[9] == 1.0 and step[10] == pytest.approx(0.1) and step[19] == pytest.approx(0.1)
    expo = _trace("exponential", gamma=0.5)
    assert expo[5] == pytest.approx(0.5) and expo[10] == pytest.approx(0.25)


def test_plateau_schedule_and_layer_groups_and_resume() -> None:
    opt = _Opt(1.0, 0.5)  # two groups (layer-wise decay): both scaled, ratio kept
    s = data.Schedule(opt, "plateau", total_steps=10, steps_per_epoch=5, gamma=0.1)
    s.epoch_end(1.0)
    s.epoch_end(0.9)
    assert opt.param_groups[1]["lr"] == 0.5
    s.epoch_end(0.95)  # no improvement: reduce
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.05])
    again = _Opt(1.0, 0.5)
    resumed = data.Schedule(again, "plateau", total_steps=10, steps_per_epoch=5, gamma=0.1)
    resumed.load_state_dict(s.state_dict())
    assert [g["lr"] for g in again.param_groups] == pytest.approx([0.1, 0.05])


def test_loss_guard_fails_on_nan_and_on_exploding_loss() -> None:
    guard = data.LossGuard(factor=10)
    guard.check(1, 2.0)
    guard.check(2, 19.0)
    with pytest.raises(TrainableError, match=r"train_loss 25 at step 3 exceeds 10 x"):
        guard.check(3, 25.0)
    with pytest.raises(TrainableError, match="train_loss is nan at step 4: training diverged"):
        data.LossGuard().check(4, float("nan"))
    with pytest.raises(TrainableError, match="train_loss is inf"):
        data.LossGuard(None).check(1, float("inf"))
    data.LossGuard(None).check(2, 1e30)  # no factor: only non-finite losses fail


def test_early_stopping_counts_epochs_without_improvement() -> None:
    stop = data.EarlyStopping(patience=2)
    assert [stop.update(v) for v in (0.5, 0.6, 0.6, 0.55)] == [False, False, False, True]
    assert not any(data.EarlyStopping(None).update(v) for v in (0.5, 0.4, 0.3))
