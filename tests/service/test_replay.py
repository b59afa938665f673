"""A PBT trial's result replayed: its lineage (every copy resolved to the steps the trial it
copied trained), and a study that trains along a schedule (``scheduler: {type: replay}``) on
a real database with a fake executor: the trial pauses at each segment's step and resumes
from its own checkpoint there with that segment's parameters; the spec refuses schedules it
cannot run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hpo.api.cli import lineage_lines
from hpo.service import replay
from hpo.service.db.models import Trial, TrialParam
from hpo.service.errors import InvalidInput
from hpo.service.executor import AttemptRef
from hpo.service.spec import StudySpec, describe_errors
from hpo.service.studies import StudyService
from tests.service.test_pbt import first_copy, launch, pbt_spec
from tests.service.test_promotion import report, save


def replay_spec(name: str, schedule: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    spec = pbt_spec(name, scheduler={"type": "replay", "schedule": schedule})
    spec["budget"] = {"max_trials": 1}
    spec.update(over)
    return spec


SCHEDULE = [
    {"step": 0, "params": {"lr": 0.1, "x": 0.5}},
    {"step": 2, "params": {"lr": 0.05}},
    {"step": 4, "params": {"lr": 0.025}},
]


def test_a_trial_pauses_at_each_segment_and_resumes_with_its_parameters(
    service: StudyService, tmp_path: Path
) -> None:
    run = launch(service, tmp_path, replay_spec("replayed", SCHEDULE), cpus=1)
    executor, scheduler, (ref,) = run.executor, run.scheduler, run.refs
    trial = service.storage.get_trial(ref.trial_id)
    assert trial.params == {"lr": 0.1, "x": 0.5} and trial.number == 0
    assert report(service, ref.trial_id, 1, 0.9) is False
    assert report(service, ref.trial_id, 2, 0.8) is True  # segment 1 starts at step 2
    own = save(service, executor, ref, tmp_path, 2)
    paused = service.storage.get_trial(ref.trial_id)
    assert paused.state == "paused"
    assert paused.events[-1].detail == "replay: paused at step 2 for segment 1"
    executor.finish(ref)
    scheduler.tick()

    second = AttemptRef(ref.trial_id, 2)
    launched = executor.launch_of[second]
    assert launched.resume_from == own  # its own checkpoint: nothing is copied
    assert launched.params == {"lr": 0.05, "x": 0.5}
    executor.place(second)
    # a report that jumps past segment 2's step pauses at that report, and says so
    assert report(service, ref.trial_id, 3, 0.7) is False
    assert report(service, ref.trial_id, 5, 0.6) is True
    save(service, executor, second, tmp_path, 5)
    detail = service.storage.get_trial(ref.trial_id).events[-1].detail
    assert (
        detail
        == "replay: paused at step 5 for segment 2 (the segment starts at step 4; no report there)"
    )
    executor.finish(second)
    scheduler.tick()

    third = AttemptRef(ref.trial_id, 3)
    assert executor.launch_of[third].params == {"lr": 0.025, "x": 0.5}
    executor.place(third)
    assert report(service, ref.trial_id, 6, 0.5) is False
    executor.finish(third, loss=0.5)
    scheduler.tick()
    trial = service.storage.get_trial(ref.trial_id)
    assert trial.state == "complete" and trial.attempts == 3
    assert [(s.step, s.params["lr"], s.attempt) for s in trial.schedule] == [
        (0, 0.1, 1), (2, 0.05, 2), (5, 0.025, 3),
    ]  # fmt: skip
    assert all(s.parent is None for s in trial.schedule)
    promotions = [e.detail for e in trial.events if e.state == "waiting"]
    assert promotions == [
        "replay: resumes its own checkpoint at step 2 with params {'lr': 0.05, 'x': 0.5}; "
        "queued for attempt 2",
        "replay: resumes its own checkpoint at step 5 with params {'lr': 0.025, 'x': 0.5}; "
        "queued for attempt 3",
    ]
    study = service.storage.get_study(run.study_id)
    assert study.state == "completed" and study.n_trials == 1
    # its lineage is the schedule it followed, from the steps it paused at
    lineage = service.storage.lineage(ref.trial_id).schedule
    assert [(s.step, s.params["lr"], s.trial_number) for s in lineage] == [
        (0, 0.1, 0), (2, 0.05, 0), (5, 0.025, 0),
    ]  # fmt: skip


def test_the_lineage_of_a_copy_is_its_donors_steps_then_its_own(
    service: StudyService, tmp_path: Path
) -> None:
    run = first_copy(service, tmp_path)
    run.executor.finish(run.worst)
    run.scheduler.tick()  # the worst trial resumes from the best one's checkpoint at step 2
    worst = service.storage.get_trial(run.worst.trial_id)
    best = service.storage.get_trial(run.best.trial_id)
    copied = worst.schedule[-1]
    assert copied.attempt == 2 and copied.parent.attempt == 1  # the donor's first attempt
    lineage = service.storage.lineage(worst.id)
    assert lineage.number == worst.number and lineage.study_id == run.study_id
    assert [(s.step, s.params, s.trial_number) for s in lineage.schedule] == [
        (0, best.params, best.number),
        (2, worst.params, worst.number),
    ]
    shown = lineage_lines(lineage, run.study_id)  # what `hpo best` prints under its schedule
    replay_it = f"hpo replay {run.study_id} --trial {worst.number} trains it again"
    assert shown[0] == f"  lineage ({replay_it}):"
    assert shown[1].startswith("    from step 0: lr=") and f"(trial {best.number})" in shown[1]
    assert shown[2].startswith("    from step 2: lr=") and f"(trial {worst.number})" in shown[2]
    # a trial that never copied is its own parameters from step 0
    own = service.storage.lineage(best.id).schedule
    assert [(s.step, s.params, s.trial_number) for s in own] == [(0, best.params, best.number)]
    # what the replay of the copy runs: the spec accepts its lineage as a schedule
    schedule = [{"step": s.step, "params": s.params} for s in lineage.schedule]
    spec = StudySpec.model_validate(replay_spec("again", schedule))
    assert spec.replay is not None and spec.replay.params_of(1) == worst.params


class _Trials:
    """The session :func:`replay.lineage` reads donors through, over trials built in memory."""

    def __init__(self, *trials: Trial) -> None:
        self.by_id = {t.id: t for t in trials}

    def get(self, _model: type, trial_id: int) -> Trial | None:
        return self.by_id.get(trial_id)


def _trial(trial_id: int, lr: float, schedule: list[dict[str, Any]] | None = None) -> Trial:
    attempts = max(1, len(schedule or []))  # one attempt per segment: nothing unrecorded
    trial = Trial(id=trial_id, number=trial_id, study_id=1, schedule=schedule, attempts=attempts)
    trial.params = [TrialParam(name="lr", position=0, value=lr)]
    return trial


def _copy(step: int, lr: float, donor: int, donor_attempt: int | None, attempt: int | None):
    parent = {"trial_id": donor, "number": donor, "step": step, "attempt": donor_attempt}
    return {"step": step, "params": {"lr": lr}, "parent": parent, "attempt": attempt}


@pytest.mark.parametrize(
    ("donor_attempt", "expected"),
    [
        # T took P's checkpoint of step 4 from P's first attempt: P's own rate trained it
        (1, [(0, 0.2, 2), (4, 0.5, 3)]),
        # ...from P's second attempt, which began at step 4 from a copy of Q: Q's steps
        (2, [(0, 0.1, 1), (4, 0.5, 3)]),
    ],
)
def test_a_copy_follows_the_attempt_that_wrote_the_checkpoint(
    donor_attempt: int, expected: list[tuple[int, float, int]]
) -> None:
    """P copied Q at step 4 and T copied P at step 4: which weights T got depends on whether
    P's checkpoint was written before P's copy (attempt 1) or is the copy (attempt 2)."""
    q = _trial(1, 0.1)
    p = _trial(2, 0.3, [{"step": 0, "params": {"lr": 0.2}, "attempt": 1}, _copy(4, 0.3, 1, 1, 2)])
    t = _trial(
        3,
        0.5,
        [{"step": 0, "params": {"lr": 0.9}, "attempt": 1}, _copy(4, 0.5, 2, donor_attempt, 2)],
    )
    got = replay.lineage(_Trials(q, p, t), t)  # type: ignore[arg-type]
    assert _steps(got) == expected and got.problems == []


def _steps(lineage: Any) -> list[tuple[int, float, int]]:
    return [(s.step, s.params["lr"], s.trial_number) for s in lineage.schedule]


def _resume(step: int, lr: float, attempt: int, from_attempt: int) -> dict[str, Any]:
    return {
        "step": step,
        "params": {"lr": lr},
        "parent": None,
        "attempt": attempt,
        "from_attempt": from_attempt,
    }


@pytest.mark.parametrize(
    ("from_attempt", "expected"),
    [
        # the yield resumed the copy (placed in attempt 2's folder): P's steps, then T's
        (2, [(0, 0.2, 2), (10, 0.5, 3)]),
        # the yield resumed T's own checkpoint from before the copy (the copy's attempt saved
        # nothing): T's own rate trained the steps before 10, the copy is gone
        (1, [(0, 0.9, 3), (10, 0.5, 3)]),
    ],
)
def test_a_resume_of_its_own_checkpoint_follows_the_attempt_that_wrote_it(
    from_attempt: int, expected: list[tuple[int, float, int]]
) -> None:
    p = _trial(2, 0.2)
    start = {"step": 0, "params": {"lr": 0.9}, "attempt": 1}
    t = _trial(3, 0.5, [start, _copy(10, 0.5, 2, 1, 2), _resume(10, 0.5, 3, from_attempt)])
    got = replay.lineage(_Trials(p, t), t)  # type: ignore[arg-type]
    assert _steps(got) == expected and got.problems == []


def test_resumes_of_one_checkpoint_are_one_segment_and_unrecorded_attempts_are_named() -> None:
    """Two yields that both resumed attempt 1's checkpoint of step 10 (the trainable saved
    nothing in between): one segment from 10, which a replay spec takes; a trial with more
    attempts than segments (a retry) is named, since its attempts reseeded unrecorded."""
    start = {"step": 0, "params": {"lr": 0.9}, "attempt": 1}
    t = _trial(3, 0.5, [start, _resume(10, 0.9, 2, 1), _resume(10, 0.5, 3, 1)])
    got = replay.lineage(_Trials(t), t)  # type: ignore[arg-type]
    assert _steps(got) == [(0, 0.9, 3), (10, 0.5, 3)] and got.problems == []
    schedule = [{"step": s.step, "params": {**s.params, "x": 0.5}} for s in got.schedule]
    assert StudySpec.model_validate(replay_spec("twice", schedule)).replay is not None
    t.attempts = 4  # a retry after the last resume
    assert got != (again := replay.lineage(_Trials(t), t))  # type: ignore[arg-type]
    assert again.problems == [
        "trial #3 started 1 attempt(s) its schedule does not record (a retry, an ASHA "
        "promotion, or a PBT yield stored before yields were segments): a trainable that "
        "reseeds when an attempt starts may replay it differently"
    ]


def test_a_chain_of_copies_is_followed_to_its_root_and_keeps_every_copy() -> None:
    """R ← Q at 2 ← T at 6 (each copying the one before), stored before segments carried
    attempts: the steps before each copy are the donor's, cut at the copy's step; a copy
    that left the rate as it was stays a segment (the replay reloads its checkpoint there,
    as Q did)."""
    r = _trial(1, 0.1)
    q = _trial(2, 0.1, [{"step": 0, "params": {"lr": 0.7}}, _copy(2, 0.1, 1, None, None)])
    t = _trial(3, 0.05, [{"step": 0, "params": {"lr": 0.9}}, _copy(6, 0.05, 2, None, None)])
    got = replay.lineage(_Trials(r, q, t), t)  # type: ignore[arg-type]
    assert _steps(got) == [(0, 0.1, 1), (2, 0.1, 2), (6, 0.05, 3)]


def test_a_lineage_that_cannot_be_followed_says_where() -> None:
    """A copied trial that is gone, or a corrupt chain that loops: the answer says so (and
    shows the trial's own segments there) instead of failing; a chain of 3,000 copies is
    followed to its root (no recursion limit)."""
    t = _trial(3, 0.5, [{"step": 0, "params": {"lr": 0.9}}, _copy(4, 0.5, 2, 1, 2)])
    gone = replay.lineage(_Trials(t), t)  # type: ignore[arg-type]
    assert _steps(gone) == [(0, 0.9, 3), (4, 0.5, 3)]
    assert gone.problems == [
        "trial #2, which trial #3 copied at step 4, is gone: the steps before are shown with "
        "trial #3's own parameters"
    ]
    a = _trial(1, 0.1, [{"step": 0, "params": {"lr": 0.2}}, _copy(4, 0.1, 2, 2, 2)])
    b = _trial(2, 0.3, [{"step": 0, "params": {"lr": 0.4}}, _copy(4, 0.3, 1, 2, 2)])
    loop = replay.lineage(_Trials(a, b), a)  # type: ignore[arg-type]
    assert loop.problems and "loops" in loop.problems[0]
    chain = [_trial(1, 0.001)] + [
        _trial(i, 0.001 * i, [{"step": 0, "params": {"lr": 0.9}}, _copy(i, 0.001 * i, i - 1, 2, 2)])
        for i in range(2, 3_001)
    ]
    deep = replay.lineage(_Trials(*chain), chain[-1])  # type: ignore[arg-type]
    assert len(deep.schedule) == 3_000 and deep.problems == []
    assert [s.step for s in deep.schedule] == [0, *range(2, 3_001)]


@pytest.mark.parametrize(
    ("schedule", "field", "message"),
    [
        ([{"step": 1, "params": {"lr": 0.1, "x": 0.5}}], "scheduler.schedule", "step 0"),
        (
            [{"step": 0, "params": {"lr": 0.1, "x": 0.5}}, {"step": 0, "params": {"lr": 0.2}}],
            "scheduler.schedule",
            "not after segment 0",
        ),
        ([{"step": 0, "params": {"lr": 0.1}}], "scheduler.schedule[0].params.x", "missing"),
        (
            [{"step": 0, "params": {"lr": 2.0, "x": 0.5}}],
            "scheduler.schedule[0].params.lr",
            "outside the space",
        ),
        (
            [{"step": 0, "params": {"lr": 0.1, "x": 0.5, "y": 1}}],
            "scheduler.schedule[0].params.y",
            "not a parameter",
        ),
        (
            [{"step": 0, "params": {"lr": 0.1, "x": 0.5}}, {"step": 3, "params": {"x": 0.4}}],
            "scheduler.schedule[1].params.x",
            "only `mutable` parameters change",
        ),
    ],
)
def test_the_spec_refuses_a_schedule_it_cannot_replay(
    schedule: list[dict[str, Any]], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        StudySpec.model_validate(replay_spec("bad", schedule))
    errors = describe_errors(caught.value)
    assert [e["field"] for e in errors] == [field] and message in errors[0]["message"]


def test_a_schedule_block_without_a_type_is_a_replay_and_a_lineage_pastes_as_it_is() -> None:
    pasted = [{**seg, "trial_number": 3} for seg in SCHEDULE]  # GET .../lineage's segments
    spec = StudySpec.model_validate(replay_spec("pasted", []) | {"scheduler": {"schedule": pasted}})
    assert spec.replay is not None and spec.replay.schedule[0].trial_number == 3


def test_a_replay_study_queues_no_trial_of_other_parameters(
    service: StudyService, tmp_path: Path
) -> None:
    study = service.create_study(StudySpec.model_validate(replay_spec("no-queue", SCHEDULE)))
    with pytest.raises(InvalidInput) as caught:
        service.enqueue_trial(study.id, {"lr": 0.7, "x": 0.9})
    assert caught.value.field == "params" and "schedule" in caught.value.message
    assert service.storage.get_study(study.id).n_trials == 0


def test_a_segment_resumes_from_the_checkpoint_there_is(
    service: StudyService, tmp_path: Path
) -> None:
    """A trainable that checkpoints every other step pauses at step 2 without a checkpoint
    there: it resumes from step 1's, and its schedule says the new parameters train from
    step 1 on (the steps it trains again)."""
    run = launch(service, tmp_path, replay_spec("sparse", SCHEDULE), cpus=1)
    (ref,) = run.refs
    assert report(service, ref.trial_id, 1, 0.9) is False
    one = save(service, run.executor, ref, tmp_path, 1)
    assert report(service, ref.trial_id, 2, 0.8) is True  # no checkpoint at step 2
    run.executor.finish(ref)
    run.scheduler.tick()
    resumed = run.executor.launch_of[AttemptRef(ref.trial_id, 2)]
    assert resumed.resume_from == one and resumed.params["lr"] == 0.05
    trial = service.storage.get_trial(ref.trial_id)
    assert [(s.step, s.params["lr"]) for s in trial.schedule] == [(0, 0.1), (1, 0.05)]


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"budget": {}}, "budget.max_trials"),
        ({"sampler": {"type": "grid"}}, "sampler.type"),
        ({"pruner": {"type": "median"}}, "pruner.type"),
        ({"trainable": None}, "scheduler.type"),
        ({"scheduler": {"type": "bohb"}}, "scheduler.type"),
    ],
)
def test_the_spec_refuses_a_replay_study_it_cannot_run(over: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        StudySpec.model_validate(replay_spec("bad", SCHEDULE, **over))
    assert [e["field"] for e in describe_errors(caught.value)] == [field]
