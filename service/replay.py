"""Replaying a hyperparameter schedule (``scheduler: {type: replay, schedule: [...]}``).

The result of a PBT study is a schedule, not one set of parameters: its best trial trained
with the parameters of the trials it copied up to each copy, then with its own. This module
turns such a trial into the flat schedule a single fresh trial can follow (:func:`lineage`),
and runs a study whose trials follow one on the pause/promote machinery PBT uses: a trial
that reports a segment's step pauses (:class:`ReplayPruner`), and the next free slot resumes
it from its own checkpoint there with that segment's parameters (:func:`retune`). Every
change is in the trial's history and its ``schedule``, as a PBT copy is.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from hpo.service.db.models import Trial
from hpo.service.pbt import change_params, resumed_segment
from hpo.service.pruners.base import PauseDecision, Pruner, PruningHistory, Report
from hpo.service.records import Lineage, LineageSegment
from hpo.service.spec import StudySpec


class ReplayPruner(Pruner):
    """Pauses a trial when its report crosses the start of a later segment of the schedule."""

    def judge(self, report: Report, history: PruningHistory) -> PauseDecision | None:
        replay = self.spec.replay
        assert replay is not None
        before = report.previous_step or 0
        index = replay.segment_at(report.step)
        if index == 0 or replay.schedule[index].step <= before:
            return None  # no segment starts in (before, step]
        return PauseDecision(
            {
                "pruner": "replay",
                "action": "retune",
                "metric": self.metric,
                "value": report.value,
                "step": report.step,
                "segment": index,
                "segment_step": replay.schedule[index].step,
            }
        )


def retune(spec: StudySpec, trial: Trial, resume_from: str | None) -> dict[str, Any]:
    """Under the study's lock, as the paused ``trial`` is promoted to resume its checkpoint
    ``resume_from``: give it the parameters of the segment it paused for, from that
    checkpoint's step on, in its schedule. Returns the promotion's reason."""
    assert spec.replay is not None
    reason = dict(trial.pause_reason or {})
    trial.pause_reason = None
    own = {p.name: p.value for p in trial.params}
    params = {**own, **spec.replay.params_of(int(reason.get("segment", 0)))}
    segment = resumed_segment(trial, resume_from, params)
    change_params(trial, segment)
    return {**reason, "segment": segment}


def pause_detail(reason: dict[str, Any]) -> str:
    late = ""
    if reason.get("step") != reason.get("segment_step"):
        late = f" (the segment starts at step {reason.get('segment_step')}; no report there)"
    return f"replay: paused at step {reason.get('step')} for segment {reason.get('segment')}{late}"


def promotion_detail(reason: dict[str, Any]) -> str:
    segment = reason.get("segment") or {}
    return (
        f"replay: resumes its own checkpoint at step {segment.get('step')} with "
        f"params {segment.get('params')}"
    )


# The longest chain of copies :func:`lineage` follows. Each copy is of a checkpoint older than
# itself, so a chain ends; this bounds a corrupt one (a cycle), which is then reported.
MAX_CHAIN = 100_000


def lineage(s: Session, trial: Trial) -> Lineage:
    """The schedule a fresh trial follows to train as ``trial`` did: each segment the
    parameters from its ``step`` on and the trial that trained with them then.

    A segment that resumed a checkpoint names where it came from: a PBT copy its ``parent``
    (the donor, and the donor's attempt that wrote the checkpoint), a resume of the trial's
    own checkpoint the attempt that wrote it (``from_attempt``). The steps before it were
    trained as that checkpoint holds them: the segments its trial had begun by that attempt,
    followed the same way, up the chain. Every such segment is kept, also one that left the
    parameters as they were: the replay resumes a checkpoint there, as the trial did.

    ``problems`` says where the chain could not be followed (a copied trial is gone, the
    chain loops: the steps before are then the trial's own segments) and which trials of the
    lineage resumed checkpoints their schedule does not record (retries, ASHA promotions,
    yields stored before they were segments), where a replay may differ."""
    pieces: list[list[LineageSegment]] = []  # each trial's part, from ``trial`` back
    problems: list[str] = []
    current: Trial | None = trial
    until: int | None = None  # the steps from here on are a later piece's
    attempt: int | None = None  # the attempt whose checkpoint ``current`` gave
    seen: set[tuple[int, int | None, int | None]] = set()
    visited: dict[int, Trial] = {}
    while current is not None:
        if (current.id, attempt, until) in seen or len(seen) >= MAX_CHAIN:
            problems.append(f"the chain of copies loops at trial #{current.number}")
            break
        seen.add((current.id, attempt, until))
        visited[current.id] = current
        segments = _held(current, until, attempt)
        sources = [i for i, seg in enumerate(segments) if _source(seg, current.id) is not None]
        start, source, source_attempt = 0, None, None
        if sources:
            start = sources[-1]
            source_id, source_attempt = _source(segments[start], current.id)  # type: ignore[misc]
            source = current if source_id == current.id else s.get(Trial, source_id)
            if source is None:
                parent = segments[start]["parent"]
                problems.append(
                    f"trial #{parent.get('number')}, which trial #{current.number} copied at "
                    f"step {segments[start]['step']}, is gone: the steps before are shown "
                    f"with trial #{current.number}'s own parameters"
                )
                start = 0
        pieces.append(
            [
                LineageSegment(
                    step=int(seg["step"]), params=dict(seg["params"]), trial_number=current.number
                )
                for seg in segments[start:]
                if until is None or seg["step"] < until
            ]
        )
        if source is None:
            break
        until, attempt, current = int(segments[start]["step"]), source_attempt, source
    for member in visited.values():
        unrecorded = member.attempts - max(1, len(member.schedule or []))
        if unrecorded > 0:
            problems.append(
                f"trial #{member.number} started {unrecorded} attempt(s) its schedule does not "
                "record (a retry, an ASHA promotion, or a PBT yield stored before yields were "
                "segments): a trainable that reseeds when an attempt starts may replay it "
                "differently"
            )
    schedule = [segment for piece in reversed(pieces) for segment in piece]
    return Lineage(
        trial_id=trial.id,
        number=trial.number,
        study_id=trial.study_id,
        schedule=schedule,
        problems=problems,
    )


def _source(segment: dict[str, Any], own_id: int) -> tuple[int, int | None] | None:
    """Where a segment's checkpoint came from: (trial id, the attempt that wrote it; None
    when not recorded) for a PBT copy (``parent``), (``own_id``, ``from_attempt``) for a
    resume of the trial's own checkpoint; None for a segment that resumed nothing (the
    first, or one stored before resumes named their attempt)."""
    parent = segment.get("parent")
    if parent:
        return int(parent["trial_id"]), parent.get("attempt")
    if segment.get("from_attempt") is not None:
        return own_id, int(segment["from_attempt"])
    return None


def _held(trial: Trial, until: int | None, attempt: int | None) -> list[dict[str, Any]]:
    """The trial's schedule segments that shaped its checkpoint of step ``until`` written by
    ``attempt`` (None: its newest state): those begun by that attempt, or, for segments
    stored before they carried their attempt, those that began before the step."""
    own = {"step": 0, "params": {p.name: p.value for p in trial.params}}
    segments = list(trial.schedule or []) or [own]
    if until is None:
        return segments
    held = [
        seg
        for seg in segments
        if (
            seg["step"] < until
            if attempt is None or seg.get("attempt") is None
            else int(seg["attempt"]) <= attempt
        )
    ]
    return held or segments[:1]
