"""The only writes of a trial's or a study's state.

Both functions check the move against the table in :mod:`hpo.service.states` first and raise
:class:`~hpo.service.states.IllegalTransition` (nothing changed) when it is not listed there.
What else a move means (values, timestamps, retries, completing the study) is decided by the
rules in :mod:`hpo.service.transitions`, which call these.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from hpo.service.db.models import Study, Trial, utcnow
from hpo.service.states import StudyState, TrialState, check_study, check_trial
from hpo.service.storage import events
from hpo.service.storage.records import spec_of
from hpo.service.storage.studies import touch


def set_trial_state(
    session: Session,
    study: Study,
    trial: Trial,
    new: TrialState | str,
    *,
    detail: str | None = None,
    now: datetime | None = None,
) -> TrialState:
    """Move ``trial`` (of the locked ``study``) to ``new``, record the event, bump ``seq``.

    Raises IllegalTransition when the table does not allow the move.
    """
    state = check_trial(trial.state, new, trial_id=trial.id)
    _clock(study, trial, state, now or utcnow())
    trial.state = state.value
    events.add(session, trial, state, detail)
    touch(study, trial, now=now)
    return state


def _clock(study: Study, trial: Trial, new: TrialState, now: datetime) -> None:
    """Count the compute of attempts: a running attempt's clock starts when the trial moves to
    running and its ranks x seconds are added to ``worker_seconds`` when it leaves running."""
    if trial.state == TrialState.RUNNING and new != TrialState.RUNNING:
        trial.worker_seconds = (trial.worker_seconds or 0.0) + attempt_seconds(study, trial, now)
        trial.attempt_started_at = None
    elif new == TrialState.RUNNING:
        trial.attempt_started_at = now


def attempt_seconds(study: Study, trial: Trial, now: datetime) -> float:
    """Ranks x seconds the trial's running attempt has used so far (0 when none runs)."""
    if trial.attempt_started_at is None:
        return 0.0
    workers = spec_of(study).resources.workers_per_trial
    return workers * max(0.0, (now - trial.attempt_started_at).total_seconds())


def set_study_state(
    study: Study, new: StudyState | str, *, reason: str, now: datetime | None = None
) -> StudyState:
    """Move the locked ``study`` to ``new`` with ``reason``; a final state stamps
    ``finished_at``. Raises IllegalTransition when the table does not allow the move."""
    state = check_study(study.state, new, study_id=study.id)
    now = now or utcnow()
    study.state = state.value
    study.state_reason = reason
    if state in (StudyState.STOPPED, StudyState.COMPLETED):
        study.finished_at = now
    elif state == StudyState.RUNNING:
        study.finished_at = None
    touch(study, now=now)
    return state
