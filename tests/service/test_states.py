"""The transition table: every allowed move works through the storage, every other one raises
IllegalTransition and changes nothing, and docs/architecture.md prints the table the code has.
Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpo.service.db.models import utcnow
from hpo.service.states import (
    ENQUEUED_TRIAL_STATE,
    NEW_STUDY_STATE,
    NEW_TRIAL_STATE,
    STUDY_TRANSITIONS,
    TRIAL_TRANSITIONS,
    IllegalTransition,
    StudyState,
    TrialState,
    markdown_table,
)
from hpo.service.storage import Storage, events, studies, trials
from hpo.service.storage.transitions import set_study_state, set_trial_state
from hpo.service.studies import StudyService
from tests.conftest import simple_spec

DOCS = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def path_to(table: dict, start: object, goal: object) -> list:
    """The shortest list of allowed moves from ``start`` to ``goal`` (breadth first)."""
    paths = {start: []}
    todo = [start]
    while todo:
        here = todo.pop(0)
        for there in table[here]:
            if there not in paths:
                paths[there] = [*paths[here], there]
                todo.append(there)
    return paths[goal]


def new_trial(storage: Storage, study_id: int, number: int, moves: list[TrialState]) -> int:
    """A trial of the study, moved along ``moves`` from where new trials start."""
    with storage.write() as s:
        study = studies.get(s, study_id, lock=True)
        trial = trials.insert(
            s, study, number, {"x": 0.0}, {"sampler": "test"}, lease_s=60, now=utcnow()
        )
        for state in moves:
            set_trial_state(s, study, trial, state)
        return trial.id


def trial_state(storage: Storage, trial_id: int) -> str:
    return storage.get_trial(trial_id, events=False).state


def test_every_trial_edge_is_allowed_and_every_other_move_refused(storage: Storage) -> None:
    study_id = _study(storage, "trials")
    number = 0
    for old in TrialState:
        for new in TrialState:
            trial_id = new_trial(
                storage, study_id, number, path_to(TRIAL_TRANSITIONS, NEW_TRIAL_STATE, old)
            )
            number += 1
            assert trial_state(storage, trial_id) == old
            if new in TRIAL_TRANSITIONS[old]:
                with storage.write() as s:
                    study, trial = trials.lock(s, trial_id)
                    set_trial_state(s, study, trial, new, detail="edge")
                record = storage.get_trial(trial_id)
                assert record.state == new, (old, new)
                assert (record.events[-1].state, record.events[-1].detail) == (new, "edge")
            else:
                seq = storage.study_seq(study_id)
                with (
                    pytest.raises(IllegalTransition, match=f"from {old} to {new}"),
                    storage.write() as s,
                ):
                    study, trial = trials.lock(s, trial_id)
                    set_trial_state(s, study, trial, new)
                assert trial_state(storage, trial_id) == old, (old, new)
                assert storage.study_seq(study_id) == seq  # nothing of it was stored


def test_every_study_edge_is_allowed_and_every_other_move_refused(storage: Storage) -> None:
    for i, old in enumerate(StudyState):
        for j, new in enumerate(StudyState):
            study_id = _study(storage, f"s{i}{j}")
            with storage.write() as s:
                study = studies.get(s, study_id, lock=True)
                assert study.state == NEW_STUDY_STATE
                for state in path_to(STUDY_TRANSITIONS, NEW_STUDY_STATE, old):
                    set_study_state(study, state, reason="path")
            if new in STUDY_TRANSITIONS[old]:
                with storage.write() as s:
                    set_study_state(studies.get(s, study_id, lock=True), new, reason="edge")
                record = storage.get_study(study_id)
                assert (record.state, record.state_reason) == (new, "edge")
                final = new in (StudyState.STOPPED, StudyState.COMPLETED)
                assert (record.finished_at is not None) == final
            else:
                with pytest.raises(IllegalTransition), storage.write() as s:
                    set_study_state(studies.get(s, study_id, lock=True), new, reason="edge")
                assert storage.get_study(study_id).state == old


def test_finished_trials_and_stopped_studies_are_final() -> None:
    assert all(not TRIAL_TRANSITIONS[s] for s in TrialState if s.finished)
    assert STUDY_TRANSITIONS[StudyState.STOPPED] == {}
    # paused is designed in: reachable from running, and it can go on or end
    assert TrialState.PAUSED in TRIAL_TRANSITIONS[TrialState.RUNNING]
    assert TrialState.WAITING in TRIAL_TRANSITIONS[TrialState.PAUSED]


def test_events_record_each_move(storage: Storage) -> None:
    study_id = _study(storage, "history")
    trial_id = new_trial(storage, study_id, 0, [TrialState.WAITING, TrialState.RUNNING])
    with storage.read() as s:
        states = [e.state for e in events.of_trial(s, trial_id)]
    assert states == ["running", "waiting", "running"]


def test_the_documented_table_is_the_one_in_the_code() -> None:
    text = DOCS.read_text()
    assert "## Trial and study states" in text
    section = text.split("## Trial and study states", 1)[1]
    assert markdown_table() in section


def _study(storage: Storage, name: str) -> int:
    with storage.write() as s:
        return studies.insert(s, name, simple_spec(name)).id


def test_every_way_a_trial_is_created_is_a_row_of_the_table(service: StudyService) -> None:
    """Asked (running) and enqueued (waiting): each creation's first event is a "(new)" row."""
    from hpo.service.spec import StudySpec

    study_id = service.create_study(StudySpec.model_validate(simple_spec("created"))).id
    enqueued = service.enqueue_trial(study_id, {"x": 0.5, "n": 2})
    asked = service.ask(study_id)  # claims the queued trial: no new one
    fresh = service.ask(study_id)
    created = {service.storage.get_trial(t).events[0].state for t in (enqueued.id, fresh.id)}
    assert asked.id == enqueued.id
    rows = [line for line in markdown_table().splitlines() if "| (new) |" in line]
    assert {line.split(" | ")[2] for line in rows if line.startswith("| trial")} == created
    assert created == {NEW_TRIAL_STATE, ENQUEUED_TRIAL_STATE}
