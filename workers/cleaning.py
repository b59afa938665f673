"""Data cleaning: drop duplicate, empty, over-long, unlabelled and unknown-label rows, and say
how many of each went (:class:`CleaningReport`), for any rows, for texts and for fixed-size
arrays."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

log = logging.getLogger("hpo.workers.cleaning")


@dataclass
class CleaningReport:
    """What :func:`clean` removed, row counts before and after."""

    rows: int
    kept: int
    duplicates: int = 0
    conflicting: int = 0  # duplicates whose label differs from the first copy's
    empty: int = 0
    too_long: int = 0
    missing_label: int = 0  # no label at all (None, or a blank string)
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

    A row is dropped when it has no label (None or blank), is empty, over-long, has a label
    outside ``known_labels``, or is a duplicate (same ``key``) of an earlier kept row; the
    first copy is kept. A duplicate with a different label is counted as ``conflicting`` as
    well.
    """
    report = CleaningReport(rows=len(rows), kept=0)
    seen: dict[Hashable, Hashable] = {}
    keep = []
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        if label is None or (isinstance(label, str) and not label.strip()):
            report.missing_label += 1
        elif known_labels is not None and label not in known_labels:
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


def publish(report: CleaningReport, ctx: Any, what: str, *, fresh: bool) -> None:
    """Make ``report`` known: the worker's log and ``ctx.extra["cleaning"]`` on every attempt,
    the metric stream at step 0 only on a fresh start (a resumed attempt sent it already)."""
    ctx.extra["cleaning"] = asdict(report)
    if ctx.is_main and fresh:
        log.info("%s: %s", what, report)
        ctx.log(0, report.as_metrics())
