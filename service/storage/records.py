"""Rows → records: what the storage hands out instead of ORM objects, and the stored spec.

A record is a frozen copy made inside the transaction, so it can leave it; nothing outside the
storage package sees a row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from hpo.service.db.models import Study, Trial, TrialEvent, utcnow
from hpo.service.records import StudyRecord, TrialEventRecord, TrialRecord
from hpo.service.spec import StudySpec
from hpo.service.states import COUNTED_TRIAL_STATES, StudyState, TrialState


@lru_cache(maxsize=256)
def _parse(spec_json: str) -> StudySpec:
    return StudySpec.model_validate_json(spec_json)


def parse_spec(raw: dict[str, Any]) -> StudySpec:
    """A stored spec (JSON) as a StudySpec; parsed once per distinct spec."""
    return _parse(json.dumps(raw))


def spec_of(study: Study) -> StudySpec:
    """The study's spec, parsed once per loaded row: the result is kept on the instance for
    as long as its ``spec`` is the same object (an edit assigns a new one, a reload reads
    one; a report asked for it six times, each a ``json.dumps`` of the spec)."""
    raw = study.spec
    memo = vars(study).get("_parsed_spec")
    if memo is not None and memo[0] is raw:
        return memo[1]
    spec = parse_spec(raw)
    vars(study)["_parsed_spec"] = (raw, spec)
    return spec


def trial_record(trial: Trial, *, events: Sequence[TrialEvent] | None = None) -> TrialRecord:
    """The trial (params loaded) as a record; ``events`` become its history when given."""
    duration = None
    if trial.started_at is not None:
        end = trial.finished_at or utcnow()
        duration = (end - trial.started_at).total_seconds()
    placement = dict(trial.placement) if trial.placement else None
    if placement:
        placement.pop("handle", None)
    return TrialRecord(
        id=trial.id,
        study_id=trial.study_id,
        number=trial.number,
        state=TrialState(trial.state),
        params={p.name: p.value for p in trial.params},
        value=trial.value,
        values=trial.values,
        attempts=trial.attempts,
        created_at=trial.created_at,
        started_at=trial.started_at,
        finished_at=trial.finished_at,
        duration_s=duration,
        lease_expires_at=trial.lease_expires_at,
        last_step=trial.last_step,
        steps_copied=trial.steps_copied or 0,
        error=trial.error,
        pruned=trial.pruned,
        suggestion=trial.suggestion,
        placement=placement,
        has_checkpoint=trial.checkpoint is not None,
        test_metrics=trial.test_metrics,
        user_attrs=dict(trial.user_attrs or {}),
        schedule=trial.schedule,
        seq=trial.seq,
        curve_seq=trial.curve_seq or trial.seq,
        events=None
        if events is None
        else [
            TrialEventRecord(time=e.time, state=e.state, attempt=e.attempt, detail=e.detail)
            for e in events
        ],
    )


def study_record(
    study: Study,
    counts: dict[str, int],
    best: TrialRecord | None,
    front: list[TrialRecord],
) -> StudyRecord:
    """The study as a record, with its trial counts per state and best trial(s)."""
    spec = study.spec
    objectives = spec["objective"] if isinstance(spec["objective"], list) else [spec["objective"]]
    return StudyRecord(
        id=study.id,
        name=study.name,
        state=StudyState(study.state),
        state_reason=study.state_reason,
        spec=spec,
        directions=[o["direction"] for o in objectives],
        created_at=study.created_at,
        updated_at=study.updated_at,
        started_at=study.started_at,
        finished_at=study.finished_at,
        n_trials=study.next_number,
        counts={s.value: counts.get(s.value, 0) for s in COUNTED_TRIAL_STATES},
        best_trial=best,
        best_trials=front,
        seq=study.seq,
    )
