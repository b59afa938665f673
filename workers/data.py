"""Helpers the built-in trainables share, so that each trainable module stays a short template.

- **Cleaning**: :func:`clean` drops duplicates, empty rows and over-long rows and says how many
  of each it removed (:class:`CleaningReport`).
- **Splits**: :func:`split` carves a stratified test set with a fixed seed, then a validation set
  (or fold ``fold`` of a stratified k-fold); :func:`subsample` takes a stratified subset.
- **Metrics**: :func:`classification_metrics` (accuracy and macro precision/recall/F1, the same
  numbers as scikit-learn's) and :func:`gathered_metrics`, which combines every DDP rank's
  predictions so that all ranks report identical values.
- **Training**: :class:`Schedule` (learning-rate schedules with warm-up), :class:`LossGuard`
  (NaN and exploding-loss check), :class:`EarlyStopping`, :func:`shard` (an evaluation shard
  per rank, without the padding ``DistributedSampler`` adds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from hpo.workers.registry import TrainableError

# ------------------------------------------------------------------------------- cleaning


@dataclass
class CleaningReport:
    """What :func:`clean` removed, row counts before and after."""

    rows: int
    kept: int
    duplicates: int = 0
    conflicting: int = 0  # duplicates whose label differs from the first copy's
    empty: int = 0
    too_long: int = 0
    unknown_label: int = 0

    @property
    def removed(self) -> int:
        return self.rows - self.kept

    def as_metrics(self, prefix: str = "data_") -> dict[str, float]:
        """Numbers for ``ctx.log(0, ...)``, e.g. ``data_duplicates``."""
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        parts = [f"{k} {v}" for k, v in asdict(self).items() if k not in ("rows", "kept") and v]
        return f"kept {self.kept} of {self.rows} rows" + (
            f" (removed: {', '.join(parts)})" if parts else ""
        )


def clean(
    rows: Sequence[Any],
    labels: Sequence[Hashable],
    *,
    key: Callable[[Any], Hashable],
    is_empty: Callable[[Any], bool] = lambda row: False,
    is_too_long: Callable[[Any], bool] = lambda row: False,
    known_labels: set[Hashable] | None = None,
) -> tuple[np.ndarray, CleaningReport]:
    """Indices of the rows to keep, and what was dropped.

    A row is dropped when it is empty, over-long, has a label outside ``known_labels``, or is a
    duplicate (same ``key``) of an earlier kept row; the first copy is kept. A duplicate with a
    different label is counted as ``conflicting`` as well.
    """
    report = CleaningReport(rows=len(rows), kept=0)
    seen: dict[Hashable, Hashable] = {}
    keep = []
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        if known_labels is not None and label not in known_labels:
            report.unknown_label += 1
        elif is_empty(row):
            report.empty += 1
        elif is_too_long(row):
            report.too_long += 1
        else:
            k = key(row)
            if k in seen:
                report.duplicates += 1
                report.conflicting += int(seen[k] != label)
                continue
            seen[k] = label
            keep.append(i)
    report.kept = len(keep)
    return np.asarray(keep, dtype=np.int64), report


def clean_texts(
    texts: Sequence[str | None],
    labels: Sequence[Hashable],
    *,
    max_chars: int | None = None,
    known_labels: set[Hashable] | None = None,
) -> tuple[np.ndarray, CleaningReport]:
    """:func:`clean` for text: duplicates ignore case and whitespace; empty is blank or None."""
    return clean(
        texts,
        labels,
        key=lambda t: " ".join(t.split()).lower(),
        is_empty=lambda t: t is None or not str(t).strip(),
        is_too_long=lambda t: max_chars is not None and len(t) > max_chars,
        known_labels=known_labels,
    )


def clean_arrays(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, CleaningReport]:
    """:func:`clean` for fixed-size arrays (images): duplicates are byte-identical rows; an
    empty row is all zeros or holds a non-finite value."""
    flat = np.ascontiguousarray(x.reshape(len(x), -1))
    return clean(
        flat,
        y.tolist(),
        key=lambda row: row.tobytes(),
        is_empty=lambda row: not np.isfinite(row).all() or not row.any(),
    )


# --------------------------------------------------------------------------------- splits


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


# -------------------------------------------------------------------------------- metrics


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], prefix: str = ""
) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1 over the labels present in ``y_true`` or
    ``y_pred`` (scikit-learn's ``average="macro"``, with 0 for a zero division)."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if len(t) == 0:
        raise ValueError("no predictions to score")
    labels = np.union1d(t, p)
    tp = np.array([np.sum((t == c) & (p == c)) for c in labels], dtype=float)
    predicted = np.array([np.sum(p == c) for c in labels], dtype=float)
    actual = np.array([np.sum(t == c) for c in labels], dtype=float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        f"{prefix}accuracy": float(np.mean(t == p)),
        f"{prefix}precision": float(precision.mean()),
        f"{prefix}recall": float(recall.mean()),
        f"{prefix}f1": float(f1.mean()),
    }


def gathered_metrics(
    ctx: Any, loss_sum: float, y_true: list[int], y_pred: list[int], prefix: str = "val_"
) -> dict[str, float]:
    """Loss and classification metrics over every rank's share (a collective: all ranks call it
    and all get the same numbers). ``loss_sum`` is this rank's summed per-row loss."""
    parts = ctx.all_gather((y_true, y_pred))
    t = [label for part in parts for label in part[0]]
    p = [label for part in parts for label in part[1]]
    (total,) = ctx.all_reduce_sum([loss_sum])
    return {f"{prefix}loss": total / len(t), **classification_metrics(t, p, prefix)}


# ------------------------------------------------------------------------------- training

ScheduleName = Literal["constant", "linear", "cosine", "step", "exponential", "plateau"]


class Schedule:
    """A learning-rate schedule stepped once per optimizer step, with linear warm-up.

    Each parameter group keeps its own base rate (layer-wise decay sets those) and is scaled by:
    ``constant`` 1; ``linear`` 1 → 0; ``cosine`` ½(1 + cos πp); ``step`` ``gamma`` every
    ``step_epochs`` epochs; ``exponential`` ``gamma`` per epoch, smoothly; ``plateau`` times
    ``gamma`` whenever the validation loss has not improved for ``patience`` + 1 epochs (call
    :meth:`epoch_end`). ``p`` is the progress after warm-up, from 0 to 1.
    """

    def __init__(
        self,
        optimizer: Any,
        kind: ScheduleName,
        *,
        total_steps: int,
        steps_per_epoch: int,
        warmup_fraction: float = 0.0,
        gamma: float = 0.5,
        step_epochs: int = 1,
        patience: int = 0,
    ) -> None:
        self.optimizer = optimizer
        self.kind = kind
        self.total = max(1, total_steps)
        self.per_epoch = max(1, steps_per_epoch)
        self.warmup = round(warmup_fraction * self.total)
        self.gamma = gamma
        self.step_epochs = step_epochs
        self.patience = patience
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.steps = 0
        self.scale = 1.0  # plateau reductions so far
        self.best = math.inf
        self.bad_epochs = 0
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        p = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        epochs = step / self.per_epoch
        if self.kind == "linear":
            return 1.0 - p
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if self.kind == "step":
            return self.gamma ** math.floor(epochs / self.step_epochs)
        if self.kind == "exponential":
            return self.gamma**epochs
        return self.scale  # constant (1.0) and plateau

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def epoch_end(self, val_loss: float) -> None:
        if self.kind != "plateau":
            return
        if val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.scale *= self.gamma
            self.bad_epochs = 0
            self._apply()

    @property
    def lr(self) -> float:
        """The current rate of the last parameter group (the head's, with layer-wise decay)."""
        return float(self.optimizer.param_groups[-1]["lr"])

    def _apply(self) -> None:
        f = self.factor(self.steps)
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * f

    def state_dict(self) -> dict[str, float]:
        return {"steps": self.steps, "scale": self.scale, "best": self.best, "bad": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.scale = int(state["steps"]), float(state["scale"])
        self.best, self.bad_epochs = float(state["best"]), int(state["bad"])
        self._apply()


class LossGuard:
    """Fails the trial when the training loss is NaN/infinite, or exploding: above ``factor``
    times the first loss seen. Raises :class:`TrainableError` (never retried)."""

    def __init__(self, factor: float | None = 10.0) -> None:
        self.factor = factor
        self.first: float | None = None

    def check(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise TrainableError(f"train_loss is {loss} at step {step}: training diverged")
        if self.first is None:
            self.first = loss
        elif self.factor is not None and loss > self.factor * max(self.first, 1e-8):
            raise TrainableError(
                f"train_loss {loss:.4g} at step {step} exceeds {self.factor:g} x the first loss "
                f"({self.first:.4g}): training diverged (exploding loss; lower the learning rate "
                "or clip gradients)"
            )


class EarlyStopping:
    """Stop once ``metric`` has not improved for ``patience`` epochs (never if None)."""

    def __init__(self, patience: int | None, mode: Literal["max", "min"] = "max") -> None:
        self.patience = patience
        self.sign = 1.0 if mode == "max" else -1.0
        self.best = -math.inf
        self.bad_epochs = 0

    def update(self, value: float) -> bool:
        """Record an epoch's value; returns whether to stop now."""
        if self.sign * value > self.best:
            self.best, self.bad_epochs = self.sign * value, 0
        else:
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "bad": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad"])
