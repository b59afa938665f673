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

from hpo.service.db.models import Trial, TrialParam
from hpo.service.pruners.base import PauseDecision, Pruner, PruningHistory, Report
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


def retune(spec: StudySpec, trial: Trial) -> dict[str, Any]:
    """Under the study's lock, as the paused ``trial`` is promoted: give it the parameters of
    the segment it paused for and add that segment, from the step it paused at, to its
    schedule. Returns the promotion's reason."""
    assert spec.replay is not None
    reason = dict(trial.pause_reason or {})
    trial.pause_reason = None
    own = {p.name: p.value for p in trial.params}
    schedule = list(trial.schedule or []) or [{"step": 0, "params": own, "attempt": 1}]
    merged = {**own, **spec.replay.params_of(int(reason.get("segment", 0)))}
    segment = {
        "step": trial.last_step or 0,
        "params": merged,
        "parent": None,
        "perturbed": {},
        "attempt": trial.attempts + 1,
    }
    trial.schedule = [*schedule, segment]
    by_name = {p.name: p for p in trial.params}
    for name, value in merged.items():
        if name in by_name:
            by_name[name].value = value
        else:
            trial.params.append(TrialParam(name=name, position=len(trial.params), value=value))
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


# The deepest chain of copies :func:`lineage` follows (each copy is of a checkpoint older than
# itself, so a chain ends; this only bounds a corrupt one).
MAX_DEPTH = 10_000


def lineage(s: Session, trial: Trial) -> list[dict[str, Any]]:
    """The schedule a fresh trial follows to train as ``trial`` did: ``[{"step", "params",
    "trial_number"}]``, each segment the parameters from ``step`` on and the trial that trained
    with them then. A PBT copy at step ``k`` of trial P's checkpoint means the steps up to
    ``k`` were P's: P's own lineage up to ``k`` stands in for the trial's earlier segments.
    Consecutive segments with the same parameters are merged."""
    out = _lineage(s, trial, until=None, attempt=None, depth=0)
    merged: list[dict[str, Any]] = []
    for segment in out:
        if merged and merged[-1]["params"] == segment["params"]:
            continue
        merged.append(segment)
    return merged


def _lineage(
    s: Session, trial: Trial, *, until: int | None, attempt: int | None, depth: int
) -> list[dict[str, Any]]:
    """``trial``'s lineage over the steps before ``until`` (None: all), as its checkpoint
    from ``attempt`` holds it (None: its newest; a segment records the attempt it began)."""
    own = {p.name: p.value for p in trial.params}
    segments = list(trial.schedule or []) or [{"step": 0, "params": own}]
    if attempt is not None:
        segments = [seg for seg in segments if _began(seg, until) <= attempt]
    elif until is not None:  # no attempt known: the segments that began before the step
        segments = [seg for seg in segments if seg["step"] < until]
    segments = segments or [{"step": 0, "params": own}]
    copies = [i for i, seg in enumerate(segments) if seg.get("parent")]
    donor = None
    if copies and depth < MAX_DEPTH:
        donor = s.get(Trial, int(segments[copies[-1]]["parent"]["trial_id"]))
    head: list[dict[str, Any]] = []
    start = 0
    if donor is not None:  # the steps before its last copy were the donor's
        start = copies[-1]
        cut, parent = int(segments[start]["step"]), segments[start]["parent"]
        head = _lineage(s, donor, until=cut, attempt=parent.get("attempt"), depth=depth + 1)
        head = [seg for seg in head if seg["step"] < cut]
    tail = [
        {"step": int(seg["step"]), "params": dict(seg["params"]), "trial_number": trial.number}
        for seg in segments[start:]
    ]
    if not head:
        tail[0]["step"] = 0
    out = head + tail
    if until is not None:
        out = [seg for seg in out if seg["step"] < until] or out[:1]
    return out


def _began(segment: dict[str, Any], until: int | None) -> int:
    """The attempt a schedule segment began (recorded since segments carry it); a segment
    without one counts as begun at attempt 0 when it starts before ``until``."""
    if segment.get("attempt") is not None:
        return int(segment["attempt"])
    if until is None or segment["step"] < until:
        return 0
    return 1 << 62
