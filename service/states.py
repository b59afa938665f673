"""The states of trials and studies, and the one table of transitions between them.

Every write of a state is checked by :func:`check_trial` or :func:`check_study`, which refuse a
transition the table does not list (:class:`IllegalTransition`). The values are strings, so
the JSON the API answers stays as it was.

A trial is ``waiting`` (queued for its next attempt), ``running`` (an attempt holds it),
``paused`` (stopped at a rung or an exploit point with a checkpoint to resume from, holding no
resources), or finished: ``complete``, ``pruned`` or ``failed``. ``docs/architecture.md`` shows
the table; ``tests/service/test_states.py`` checks that the two agree.
"""

from __future__ import annotations

from enum import Enum

from hpo.service.errors import Conflict


class TrialState(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        return self in FINISHED_TRIAL_STATES

    @property
    def active(self) -> bool:
        return self in ACTIVE_TRIAL_STATES


class StudyState(str, Enum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    COMPLETED = "completed"

    def __str__(self) -> str:
        return self.value


# Active trials hold (or are about to hold) a slot of max_concurrent; paused ones do not.
ACTIVE_TRIAL_STATES = frozenset({TrialState.WAITING, TrialState.RUNNING})
FINISHED_TRIAL_STATES = frozenset({TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAILED})
# The states a study's ``counts`` report, in this order (the REST contract; ``paused`` came last
# of the active ones, after the others were published).
COUNTED_TRIAL_STATES = (
    TrialState.WAITING,
    TrialState.RUNNING,
    TrialState.PAUSED,
    TrialState.COMPLETE,
    TrialState.PRUNED,
    TrialState.FAILED,
)
# Where a new row starts: ask creates a trial already claimed by its asker; a study runs at once.
NEW_TRIAL_STATE = TrialState.RUNNING
# A trial queued with fixed parameters (Optuna's enqueue_trial) is created waiting: the next
# ask claims it as it claims a retried trial.
ENQUEUED_TRIAL_STATE = TrialState.WAITING
NEW_STUDY_STATE = StudyState.RUNNING

# new state → why it may follow each old state (the "why" is the documentation of the edge).
TRIAL_TRANSITIONS: dict[TrialState, dict[TrialState, str]] = {
    TrialState.WAITING: {
        TrialState.RUNNING: "an asker or the scheduler claims it for its next attempt",
        TrialState.FAILED: "its study is stopped, or it can never run",
    },
    TrialState.RUNNING: {
        TrialState.COMPLETE: "its objective value(s) are told",
        TrialState.PRUNED: "the pruner stops it, or it is told pruned",
        TrialState.FAILED: "its attempt fails with no retry left, or its study is stopped",
        TrialState.WAITING: "its attempt fails and a retry is left (same number)",
        TrialState.PAUSED: "it reached a rung or exploit point and saved a checkpoint",
    },
    TrialState.PAUSED: {
        TrialState.WAITING: "it is promoted or resumed (it continues from its checkpoint)",
        TrialState.PRUNED: "its study ends without promoting it",
        TrialState.FAILED: "its study is stopped, or its checkpoint is missing or unreadable",
    },
    TrialState.COMPLETE: {},
    TrialState.PRUNED: {},
    TrialState.FAILED: {},
}

STUDY_TRANSITIONS: dict[StudyState, dict[StudyState, str]] = {
    StudyState.RUNNING: {
        StudyState.PAUSED: "paused through the API (running trials drain)",
        StudyState.STOPPED: "stopped through the API (active trials fail)",
        StudyState.COMPLETED: "its budget is spent (or its time is up) and no trial is active",
    },
    StudyState.PAUSED: {
        StudyState.RUNNING: "resumed through the API",
        StudyState.STOPPED: "stopped through the API (active trials fail)",
        StudyState.COMPLETED: "its budget is spent (or its time is up) and no trial is active",
    },
    StudyState.COMPLETED: {
        StudyState.RUNNING: "its budget is raised: it runs again",
    },
    StudyState.STOPPED: {},
}


class IllegalTransition(Conflict):
    """A state change that the transition table does not allow (HTTP 409)."""

    code = "illegal_transition"


def can_move_trial(old: str, new: str) -> bool:
    return TrialState(new) in TRIAL_TRANSITIONS[TrialState(old)]


def check_trial(old: str, new: str, *, trial_id: int | None = None) -> TrialState:
    """``new`` as a TrialState, if a trial in ``old`` may move there; else IllegalTransition."""
    if not can_move_trial(old, new):
        who = f"trial {trial_id}" if trial_id is not None else "a trial"
        raise IllegalTransition(f"{who} cannot go from {old} to {new}", field="state")
    return TrialState(new)


def can_move_study(old: str, new: str) -> bool:
    return StudyState(new) in STUDY_TRANSITIONS[StudyState(old)]


def check_study(old: str, new: str, *, study_id: int | None = None) -> StudyState:
    """``new`` as a StudyState, if a study in ``old`` may move there; else IllegalTransition."""
    if not can_move_study(old, new):
        who = f"study {study_id}" if study_id is not None else "a study"
        raise IllegalTransition(f"{who} cannot go from {old} to {new}", field="state")
    return StudyState(new)


def markdown_table() -> str:
    """The transition tables as one Markdown table (pasted into docs/architecture.md, which a
    test keeps equal to this)."""
    lines = ["| Kind | From | To | When |", "| --- | --- | --- | --- |"]
    lines.append(f"| trial | (new) | {NEW_TRIAL_STATE} | asked: a new suggestion is handed out |")
    lines.append(
        f"| trial | (new) | {ENQUEUED_TRIAL_STATE} | enqueued with fixed parameters "
        "(`POST /studies/{id}/queue`) |"
    )
    for kind, table in (("trial", TRIAL_TRANSITIONS), ("study", STUDY_TRANSITIONS)):
        if kind == "study":
            lines.append(f"| study | (new) | {NEW_STUDY_STATE} | created |")
        for old, targets in table.items():
            if not targets:
                lines.append(f"| {kind} | {old} | — | final |")
            for new, why in targets.items():
                lines.append(f"| {kind} | {old} | {new} | {why} |")
    return "\n".join(lines) + "\n"
