"""Classification metrics: accuracy and macro precision/recall/F1 (scikit-learn's numbers), and
the same over every DDP rank's predictions, identical on all ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


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


def held_out_metrics(loss_sum: float, y_true: list[int], y_pred: list[int]) -> dict[str, float]:
    """What ``evaluate`` reports for a test split: ``test_loss`` (the mean of ``loss_sum``),
    accuracy and macro precision/recall/F1, and ``test_samples``."""
    metrics = classification_metrics(y_true, y_pred, prefix="test_")
    return {"test_loss": loss_sum / len(y_true), **metrics, "test_samples": len(y_true)}
