"""Flat rows of a study's trials: the CSV export and the client's DataFrame share them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hpo.service.records import TrialRecord

BASE_COLUMNS = ["number", "trial_id", "state"]
TAIL_COLUMNS = [
    "attempts",
    "last_step",
    "started_at",
    "finished_at",
    "duration_s",
    "error",
]


def trial_rows(
    trials: Sequence[TrialRecord], objective_metrics: Sequence[str]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and one row per trial (``value`` or ``value_<metric>``,
    ``params_<name>``, ``user_attrs_<key>``)."""
    value_cols = (
        ["value"] if len(objective_metrics) == 1 else [f"value_{m}" for m in objective_metrics]
    )
    param_names: list[str] = []
    for t in trials:
        for name in t.params:
            if name not in param_names:
                param_names.append(name)
    attr_names: list[str] = []
    for t in trials:
        attr_names.extend(k for k in t.user_attrs if k not in attr_names)
    columns = [
        *BASE_COLUMNS,
        *value_cols,
        *(f"params_{p}" for p in param_names),
        *(f"user_attrs_{a}" for a in attr_names),
        *TAIL_COLUMNS,
    ]
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        values = t.values if t.values is not None else ([t.value] if t.value is not None else [])
        row: dict[str, Any] = {"number": t.number, "trial_id": t.id, "state": t.state}
        for i, col in enumerate(value_cols):
            row[col] = values[i] if i < len(values) else None
        for p in param_names:
            row[f"params_{p}"] = t.params.get(p)
        for a in attr_names:
            row[f"user_attrs_{a}"] = t.user_attrs.get(a)
        row.update(
            attempts=t.attempts,
            last_step=t.last_step,
            started_at=t.started_at.isoformat() if t.started_at else None,
            finished_at=t.finished_at.isoformat() if t.finished_at else None,
            duration_s=t.duration_s,
            error=t.error,
        )
        rows.append(row)
    return columns, rows
