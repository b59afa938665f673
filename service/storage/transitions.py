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
    trial.state = state.value
    events.add(session, trial, state, detail)
    touch(study, trial, now=now)
    return state


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
