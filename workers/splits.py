"""Splits of cleaned data: a stratified train/validation/test split fixed by its seed (or
fold ``fold`` of a stratified k-fold), stratified subsets, and per-rank evaluation shards."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field, model_validator


@dataclass(frozen=True)
class Split:
    """Row indices of each part; disjoint, together the whole cleaned data."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split(
    labels: Sequence[Hashable],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    folds: int | None = None,
    fold: int = 0,
) -> Split:
    """A stratified train/validation/test split that depends only on ``labels`` and ``seed``.

    The test set (``test_fraction`` of all rows) is carved first, so it stays the same whatever
    ``val_fraction``, ``folds`` or ``fold`` are. The rest is split into train and validation:
    ``val_fraction`` of all rows, or, with ``folds``, fold ``fold`` of a stratified k-fold.
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    y = np.asarray(labels)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    if folds is not None:
        if not 0 <= fold < folds:
            raise ValueError(f"fold must lie in [0, {folds}), got {fold}")
        kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        train_pos, val_pos = list(kfold.split(rest, y[rest]))[fold]
        train, val = rest[train_pos], rest[val_pos]
    else:
        share = val_fraction / (1.0 - test_fraction)
        train, val = train_test_split(rest, test_size=share, random_state=seed, stratify=y[rest])
    return Split(np.sort(train), np.sort(val), np.sort(test))


def subsample(
    indices: np.ndarray, labels: Sequence[Hashable], n: int | None, seed: int
) -> np.ndarray:
    """At most ``n`` of ``indices``, stratified by ``labels`` (all of them if ``n`` is None)."""
    from sklearn.model_selection import train_test_split

    if n is None or n >= len(indices):
        return indices
    y = np.asarray(labels)[indices]
    _, counts = np.unique(y, return_counts=True)
    stratify = y if n >= len(counts) and counts.min() >= 2 else None
    kept, _ = train_test_split(indices, train_size=n, random_state=seed, stratify=stratify)
    return np.sort(kept)


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of ``n`` evaluation rows: every row on exactly one rank (no padding,
    unlike ``DistributedSampler``, so gathered metrics count each row once)."""
    return list(range(rank, n, world_size))


class SplitSettings(BaseModel):
    """The split settings a trainable's settings model can inherit (see :func:`split_by`)."""

    val_fraction: float = Field(default=0.15, gt=0, lt=1)
    test_fraction: float = Field(default=0.15, gt=0, lt=1)
    folds: int | None = Field(default=None, ge=2, le=20)
    fold: int = Field(default=0, ge=0)
    split_seed: int = Field(default=0, ge=0, description="Fixes the splits.")

    @model_validator(mode="after")
    def _check_split(self) -> SplitSettings:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"fold must be below folds ({self.folds})")
        return self


def split_by(labels: Sequence[Hashable], s: SplitSettings) -> Split:
    """:func:`split` with the fractions, folds and seed of ``s``."""
    return split(
        labels,
        val_fraction=s.val_fraction,
        test_fraction=s.test_fraction,
        seed=s.split_seed,
        folds=s.folds,
        fold=s.fold,
    )
