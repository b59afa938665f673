"""A study's trials for export: flat rows (the CSV export and the client's DataFrame share
them) and one run per trial (the TensorBoard and MLflow exports, :mod:`hpo.api.integrations`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hpo.service.records import MetricPointRecord, StudyRecord, TrialRecord
from hpo.service.spec import StudySpec

BASE_COLUMNS = ["number", "trial_id", "state"]
TAIL_COLUMNS = [
    "attempts",
    "last_step",
    "started_at",
    "finished_at",
    "duration_s",
    "error",
    "steps_copied",  # last: added later, so the columns before it keep their positions
]


def newest_versions(trials: Iterable[TrialRecord]) -> list[TrialRecord]:
    """Each trial once, as its last version in ``trials``: pages read by change cursor give a
    trial that changed between two reads twice (in order of its last appearance)."""
    newest: dict[int, TrialRecord] = {}
    for t in trials:
        newest.pop(t.id, None)
        newest[t.id] = t
    return list(newest.values())


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell: a JSON object or list as JSON text (readable back), anything
    else as it is."""
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def _iso(when: datetime | None) -> str | None:
    """One form for every time, microseconds included: ``isoformat()`` leaves them out on a
    whole second, and a reader that takes its format from the first row (pandas) then
    refuses the rest."""
    return when.isoformat(timespec="microseconds") if when else None


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
            started_at=_iso(t.started_at),
            finished_at=_iso(t.finished_at),
            duration_s=t.duration_s,
            error=t.error,
            steps_copied=t.steps_copied,
        )
        rows.append(row)
    return columns, rows


@dataclass
class TrialRun:
    """One trial as an experiment tracker's run (TensorBoard, MLflow): its params, final
    value(s), every metric series and the tags that say which trial of which study it is."""

    name: str
    params: dict[str, Any]
    values: dict[str, float]
    tags: dict[str, str]
    series: dict[str, list[tuple[int, float, datetime]]] = field(default_factory=dict)
    state: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None


def trial_runs(
    study: StudyRecord,
    trials: Sequence[TrialRecord],
    points_of: Callable[[TrialRecord], Sequence[MetricPointRecord]],
) -> list[TrialRun]:
    """One run per trial, by number. ``values`` are named as the CSV's value columns
    (``value``, or ``value_<metric>`` for several objectives). A series keeps, at each step, the
    point of the latest attempt that reported it (a retried trial restarts its steps)."""
    objective = StudySpec.model_validate(study.spec).objectives
    value_names = ["value"] if len(objective) == 1 else [f"value_{o.metric}" for o in objective]
    runs = []
    for t in sorted(trials, key=lambda t: t.number):
        finals = t.values if t.values is not None else ([t.value] if t.value is not None else [])
        latest: dict[tuple[str, int], MetricPointRecord] = {}
        for p in sorted(points_of(t), key=lambda p: (p.attempt, p.step)):
            latest[(p.name, p.step)] = p
        series: dict[str, list[tuple[int, float, datetime]]] = {}
        for (name, step), p in sorted(latest.items()):
            series.setdefault(name, []).append((step, p.value, p.time))
        tags = {
            "hpo.study": study.name,
            "hpo.study_id": str(study.id),
            "hpo.trial": str(t.number),
            "hpo.trial_id": str(t.id),
            "hpo.state": t.state,
            "hpo.attempts": str(t.attempts),
        }
        if t.error:
            tags["hpo.error"] = t.error[:500]
        runs.append(
            TrialRun(
                name=f"trial-{t.number:04d}",
                params=dict(t.params),
                values={
                    n: float(v) for n, v in zip(value_names, finals, strict=False) if v is not None
                },
                tags=tags,
                series=series,
                state=t.state,
                started_at=t.started_at,
                finished_at=t.finished_at,
            )
        )
    return runs
