"""Splits: fixed by their seed, disjoint, complete, stratified; k-fold; subsets; shards."""

from __future__ import annotations

import numpy as np
import pytest

from hpo.workers import splits


def _labels(n: int = 500) -> np.ndarray:
    return np.random.default_rng(1).choice(5, size=n, p=[0.4, 0.3, 0.15, 0.1, 0.05])


def test_split_is_fixed_by_its_seed_disjoint_complete_and_stratified() -> None:
    y = _labels()
    a = splits.split(y, val_fraction=0.2, test_fraction=0.1, seed=7)
    b = splits.split(y, val_fraction=0.2, test_fraction=0.1, seed=7)
    c = splits.split(y, val_fraction=0.2, test_fraction=0.1, seed=8)
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
    plain = splits.split(y, val_fraction=0.2, test_fraction=0.1, seed=3)
    folds = [
        splits.split(y, val_fraction=0.2, test_fraction=0.1, seed=3, folds=4, fold=k)
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
        splits.split(y, val_fraction=0.2, test_fraction=0.1, seed=3, folds=4, fold=4)


def test_subsample_is_stratified_and_fixed() -> None:
    y = _labels(1000)
    idx = np.arange(1000)
    a = splits.subsample(idx, y, 200, seed=0)
    assert np.array_equal(a, splits.subsample(idx, y, 200, seed=0)) and len(a) == 200
    assert np.abs(np.bincount(y[a], minlength=5) / 200 - np.bincount(y) / 1000).max() < 0.01
    assert splits.subsample(idx, y, None, seed=0) is idx
    assert splits.shard(7, 0, 2) == [0, 2, 4, 6] and splits.shard(7, 1, 2) == [1, 3, 5]
