"""Population based training on a real database with a fake executor: at an interval boundary
the bottom trial pauses naming a top one, the next free slot resumes it (same number, next
attempt, no new trial) from that trial's checkpoint with its parameters, the mutable ones
explored, and its schedule and history say so; the spec refuses what PBT cannot run."""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpo.api.cli import schedule_lines
from hpo.service import pbt
from hpo.service.executor import AttemptRef
from hpo.service.pbt import explore
from hpo.service.records import MetricInput
from hpo.service.scheduler import Scheduler
from hpo.service.spec import IntParam, StudySpec
from hpo.service.storage import trials
from hpo.service.studies import StudyService
from hpo.workers import checkpoints
from tests.service.fake_executor import FakeCluster, FakeExecutor
from tests.service.test_promotion import asks_at_once, report, save

SPACE = {
    "lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True, "mutable": True},
    "x": {"type": "float", "low": 0.0, "high": 1.0},
}


def pbt_spec(name: str, **over: object) -> dict:
    spec: dict = {
        "name": name,
        "objective": {"metric": "loss", "direction": "minimize"},
        "sampler": {"type": "random", "seed": 0},
        "scheduler": {"type": "pbt", "population": 4, "interval_steps": 2, "resample_p": 0.0},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "trainable": {"name": "synthetic", "config": {"steps": 6}},
        "space": SPACE,
    }
    spec.update(over)
    return spec


@dataclass
class Launched:
    """A PBT study on a fake cluster after its first tick: its first attempts, by trial id."""

    study_id: int
    refs: list[AttemptRef]
    executor: FakeExecutor
    scheduler: Scheduler


def launch(
    service: StudyService, tmp_path: Path, spec: dict, *, cpus: int = 2, place: bool = True
) -> Launched:
    """Create the study and tick once: ``cpus`` trials start (and are placed on workers,
    unless ``place`` is false)."""
    executor = FakeExecutor(FakeCluster(capacity={"CPU": float(cpus)}))
    scheduler = Scheduler(
        service, executor, api_url="http://127.0.0.1:1", token=None, checkpoint_dir=tmp_path
    )
    study_id = service.create_study(StudySpec.model_validate(spec)).id
    scheduler.tick()
    refs = sorted(executor.launched)
    assert len(refs) == cpus
    if place:
        for ref in refs:
            executor.place(ref)
    return Launched(study_id, refs, executor, scheduler)


def pair(name: str, **pbt_over: object) -> dict:
    """The spec of a population of two, with a boundary every two steps."""
    block = {"type": "pbt", "population": 2, "interval_steps": 2, **pbt_over}
    return pbt_spec(name, scheduler=block)


@dataclass
class FirstCopy:
    """A PBT study of four trials whose worst one copied the best at step 2."""

    study_id: int
    refs: list[AttemptRef]  # the four first attempts, by trial id
    paths: dict[int, str]  # trial id -> its checkpoint at step 2
    executor: FakeExecutor
    scheduler: Scheduler

    @property
    def worst(self) -> AttemptRef:
        return self.refs[0]

    @property
    def best(self) -> AttemptRef:
        return self.refs[3]


def first_copy(service: StudyService, tmp_path: Path, name: str = "pbt") -> FirstCopy:
    """Four trials report steps 1 and 2 (losses 0.4 > 0.3 > 0.2 > 0.1 there, the worst
    last) and checkpoint at 2; the worst pauses (to resume it: end its attempt, then tick)."""
    run = launch(service, tmp_path, pbt_spec(name), cpus=4)
    study_id, refs, executor, scheduler = run.study_id, run.refs, run.executor, run.scheduler
    losses = dict(zip([r.trial_id for r in refs], [0.4, 0.3, 0.2, 0.1], strict=True))
    for ref in refs:
        assert report(service, ref.trial_id, 1, losses[ref.trial_id] + 1) is False  # no boundary
    paths = {}
    # at boundary 2: the first three see fewer than four values there; ranked as they come
    for ref in refs[1:]:
        assert report(service, ref.trial_id, 2, losses[ref.trial_id]) is False
        paths[ref.trial_id] = save(service, executor, ref, tmp_path, 2)
    worst = refs[0]
    assert report(service, worst.trial_id, 2, 0.5) is True  # bottom 1 of 4: exploit
    paths[worst.trial_id] = save(service, executor, worst, tmp_path, 2)
    return FirstCopy(study_id, refs, paths, executor, scheduler)


def test_the_bottom_trial_copies_a_top_one_and_explores(
    service: StudyService, tmp_path: Path
) -> None:
    run = first_copy(service, tmp_path)
    study_id, refs, paths, executor, scheduler = (
        run.study_id, run.refs, run.paths, run.executor, run.scheduler
    )  # fmt: skip
    worst, best = run.worst, run.best
    paused = service.storage.get_trial(worst.trial_id)
    assert paused.state == "paused"
    detail = paused.events[-1].detail
    assert "pbt exploit: paused" in detail and "rank 4 of 4" in detail
    assert f"will copy trial #{service.storage.get_trial(best.trial_id).number}" in detail
    executor.finish(worst)
    scheduler.tick()  # the attempt ended: released, then resumed at once

    resumed = AttemptRef(worst.trial_id, 2)
    assert executor.launched[4:] == [resumed]  # the same trial's next attempt, no new trial
    relaunch = executor.launch_of[resumed]
    # the top trial's checkpoint, copied into the folder of this trial's new attempt (the top
    # trial goes on pruning its own; a retry of this attempt resumes from the copy)
    copied = Path(relaunch.resume_from)
    assert copied.name == Path(paths[best.trial_id]).name == "checkpoint-000002"
    assert copied.parent == Path(paths[worst.trial_id]).parent.parent / "attempt-2"
    for file in ("state.pt", "meta.json"):
        assert (copied / file).read_bytes() == (Path(paths[best.trial_id]) / file).read_bytes()
    assert checkpoints.candidates(copied.parent.parent, before_attempt=3)[0] == copied
    donor = service.storage.get_trial(best.trial_id)
    trial = service.storage.get_trial(worst.trial_id)
    assert trial.state == "running" and trial.attempts == 2 and trial.number == 0
    assert relaunch.params == trial.params
    assert trial.params["x"] == donor.params["x"]  # copied
    assert trial.params["lr"] == pytest.approx(donor.params["lr"] * 0.8) or trial.params[
        "lr"
    ] == pytest.approx(min(1.0, donor.params["lr"] * 1.2))  # explored
    first, segment = trial.schedule
    assert first.step == 0 and first.parent is None and first.params != trial.params
    assert segment.step == 2 and segment.params == trial.params
    assert segment.parent.trial_id == donor.id and segment.parent.number == donor.number
    assert segment.perturbed["lr"] in ("x0.8", "x1.2") and "x" not in segment.perturbed
    promotion = next(e.detail for e in trial.events if e.state == "waiting")
    assert f"pbt exploit: copies trial #{donor.number} at step 2" in promotion
    assert service.storage.get_study(study_id).n_trials == 4
    shown = schedule_lines(trial)  # what `hpo best` prints for it
    assert shown[0] == "  schedule:"
    assert shown[1].startswith("    from step 0: lr=") and "copied" not in shown[1]
    assert shown[2].startswith("    from step 2: lr=")
    assert f"(copied trial {donor.number} at step 2; lr x" in shown[2]

    # it goes on from step 3 of its copy; every trial ends, the study completes with 4
    executor.place(resumed)
    assert report(service, worst.trial_id, 3, 0.05) is False
    for ref in [*refs[1:], resumed]:
        executor.finish(ref, loss=0.01)
    scheduler.tick()
    study = service.storage.get_study(study_id)
    assert study.state == "completed" and study.n_trials == 4 and study.counts["complete"] == 4


def test_a_trial_copies_nothing_when_its_donor_has_no_checkpoint(
    service: StudyService, tmp_path: Path
) -> None:
    run = launch(service, tmp_path, pair("lonely"))
    executor, scheduler, (good, bad) = run.executor, run.scheduler, run.refs
    assert report(service, good.trial_id, 2, 0.1) is False  # reports, never checkpoints
    assert report(service, bad.trial_id, 2, 0.9) is True
    own = save(service, executor, bad, tmp_path, 2)
    executor.finish(bad)
    scheduler.tick()
    resumed = executor.launch_of[AttemptRef(bad.trial_id, 2)]
    assert resumed.resume_from == own  # its own checkpoint: nothing to copy
    trial = service.storage.get_trial(bad.trial_id)
    assert [(s.step, s.parent, s.params) for s in trial.schedule] == [
        (0, None, trial.params),
        (2, None, trial.params),
    ]
    promotion = next(e.detail for e in trial.events if e.state == "waiting")
    assert "resumes its own checkpoint" in promotion and "could not copy trial #" in promotion


def test_steps_skipped_by_copying_a_trial_ahead_are_not_charged_twice(
    service: StudyService, tmp_path: Path
) -> None:
    """A trial that copies a checkpoint one step ahead of its own last step goes on from
    there without being charged, in ``budget.max_steps``, for the step its donor trained
    (and was charged for)."""
    spec = pair("ahead")
    spec["budget"] = {"max_trials": 2, "max_steps": 9}
    run = launch(service, tmp_path, spec)
    good, bad = run.refs
    assert report(service, good.trial_id, 2, 0.1) is False
    assert report(service, bad.trial_id, 2, 0.9) is True  # exploit: copy good
    save(service, run.executor, bad, tmp_path, 2)
    assert report(service, good.trial_id, 3, 0.08) is False
    save(service, run.executor, good, tmp_path, 3)  # good's newest checkpoint: step 3
    run.executor.finish(bad)
    run.scheduler.tick()
    resumed = AttemptRef(bad.trial_id, 2)
    run.executor.place(resumed)
    assert Path(run.executor.launch_of[resumed].resume_from).name == "checkpoint-000003"

    def used() -> int:
        with service.storage.read() as s:
            return trials.steps_used(s, run.study_id)

    assert used() == 3 + 2  # good trained 3 steps, bad 2 of its own (it skipped step 3)
    copier = service.storage.get_trial(bad.trial_id)
    assert (copier.last_step, copier.steps_copied) == (3, 1)  # shown in its record
    assert report(service, bad.trial_id, 4, 0.07) is False
    assert report(service, good.trial_id, 4, 0.06) is False
    assert used() == 4 + 3
    assert report(service, good.trial_id, 5, 0.05) is False
    assert used() == 5 + 3
    assert report(service, bad.trial_id, 5, 0.04) is False  # the 9th step: the budget's last
    assert report(service, good.trial_id, 6, 0.03) is True  # the 10th: over
    trial = service.storage.get_trial(good.trial_id)
    assert trial.state == "pruned" and "budget.max_steps (9) spent" in trial.events[-1].detail


def donor_ran_ahead(
    service: StudyService, tmp_path: Path, spec: dict
) -> tuple[Launched, AttemptRef, AttemptRef, dict[int, str]]:
    """Two trials: ``bad`` pauses at step 2 to copy ``good``, which runs on to step 4 (its
    checkpoints at 2, 3 and 4, by step) before ``bad``'s attempt ends."""
    run = launch(service, tmp_path, spec)
    good, bad = run.refs
    saved = {}
    assert report(service, good.trial_id, 2, 0.1) is False
    saved[2] = save(service, run.executor, good, tmp_path, 2)
    assert report(service, bad.trial_id, 2, 0.9) is True  # exploit: copy good
    save(service, run.executor, bad, tmp_path, 2)
    for step in (3, 4):
        assert report(service, good.trial_id, step, 0.1 - step / 100) is False
        saved[step] = save(service, run.executor, good, tmp_path, step)
    return run, good, bad, saved


def resume(run: Launched, ref: AttemptRef) -> AttemptRef:
    """End the paused trial's attempt; the next tick resumes it: its next attempt, placed."""
    run.executor.finish(ref)
    run.scheduler.tick()
    resumed = AttemptRef(ref.trial_id, ref.attempt + 1)
    run.executor.place(resumed)
    return resumed


def test_a_copy_ahead_is_not_judged_again_at_the_boundary_it_skipped(
    service: StudyService, tmp_path: Path
) -> None:
    """A trial that paused at 2 and copied a checkpoint at 4 goes on from 4: its report at 5
    crosses no boundary (from its own step 2 it would cross 4, and be judged there again)."""
    run, _, bad, _ = donor_ran_ahead(service, tmp_path, pair("ahead"))
    resumed = resume(run, bad)
    assert Path(run.executor.launch_of[resumed].resume_from).name == "checkpoint-000004"
    assert service.storage.get_trial(bad.trial_id).last_step == 4
    assert report(service, bad.trial_id, 5, 0.9) is False  # worse than good at 4: no matter
    assert report(service, bad.trial_id, 6, 0.9) is False  # nobody else at 6 yet


@pytest.mark.parametrize("kept", [True, False])
def test_a_donor_at_its_last_step_is_copied_from_the_boundary(
    service: StudyService, tmp_path: Path, kept: bool
) -> None:
    """With ``scheduler.max_steps`` 4, a donor that reached step 4 while the trial waited is
    copied from its checkpoint at the boundary (2), not its last one (which would end the
    trial at once with the donor's result); when that one is gone, nothing is copied."""
    run, good, bad, saved = donor_ran_ahead(service, tmp_path, pair("last", max_steps=4))
    if not kept:  # the donor keeps only its newest checkpoints
        shutil.rmtree(saved[2])
    resumed = resume(run, bad)
    resume_from = Path(run.executor.launch_of[resumed].resume_from)
    trial = service.storage.get_trial(bad.trial_id)
    promotion = next(e.detail for e in trial.events if e.state == "waiting")
    if kept:
        assert resume_from.name == "checkpoint-000002"
        assert resume_from.parent.name == "attempt-2"  # copied into its own folder
        assert trial.schedule[-1].parent.trial_id == good.trial_id
        assert trial.schedule[-1].step == 2
    else:
        # it goes on from its own checkpoint at 2, with its own parameters
        assert [(s.step, s.parent, s.params) for s in trial.schedule[1:]] == [
            (2, None, trial.params)
        ]
        assert resume_from.parent.name == "attempt-1"
        assert "reached its last step (4)" in promotion, promotion


def test_the_step_of_a_checkpoint_is_read_from_its_own_name() -> None:
    root = "/data/checkpoint-2024/study-1/trial-2/attempt-1"
    assert checkpoints.step_of(f"{root}/checkpoint-000007") == 7
    assert checkpoints.step_of(f"s3://bucket/{root}/checkpoint-000007/") == 7
    assert checkpoints.step_of(root) is None


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"trainable": None}, "scheduler.type"),
        ({"pruner": {"type": "median"}}, "pruner.type"),
        ({"space": {"x": {"type": "float", "low": 0, "high": 1}}}, "space"),
        ({"budget": {"max_trials": 9}}, "budget.max_trials"),
        ({"sampler": {"type": "grid"}}, "sampler.type"),
        (
            {"scheduler": {"type": "pbt", "population": 4, "interval_steps": 4, "max_steps": 4}},
            "scheduler.max_steps",
        ),
    ],
)
def test_the_spec_refuses_what_pbt_cannot_run(
    service: StudyService, over: dict, field: str
) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        service.create_study(StudySpec.model_validate(pbt_spec("refused", **over)))


def test_mutable_parameters_need_pbt() -> None:
    spec = pbt_spec("no-pbt")
    del spec["scheduler"]
    with pytest.raises(ValueError, match="mutable"):
        StudySpec.model_validate(spec)


def test_a_population_larger_than_the_cluster_takes_turns(
    service: StudyService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four trials, two slots: a trial at a boundary with trials waiting behind it pauses
    and lets them train; trials not started yet go first, then the least advanced resumes.
    (Waiting counts at once here: the grace that spares trials about to get a free slot is
    tested below.)"""
    monkeypatch.setattr(pbt, "YIELD_GRACE_S", 0.0)
    run = launch(service, tmp_path, pbt_spec("turns"), place=False)
    executor, scheduler, (a, b) = run.executor, run.scheduler, run.refs

    def at_boundary(ref: AttemptRef, step: int, loss: float, pauses: bool) -> None:
        executor.place(ref)
        assert report(service, ref.trial_id, step, loss) is pauses
        if pauses:
            save(service, executor, ref, tmp_path, step)
            executor.finish(ref)
            scheduler.tick()

    at_boundary(a, 2, 0.1, pauses=True)  # nobody to compare with; two trials not started
    (c,) = executor.launched[2:]
    assert c.attempt == 1 and c.trial_id not in (a.trial_id, b.trial_id)  # a new trial
    detail = service.storage.get_trial(a.trial_id).events[-1].detail
    assert detail == "pbt: paused at step 2 (boundary 2): 2 trial(s) wait behind it for a slot"
    at_boundary(b, 2, 0.05, pauses=True)  # better than a: no copy, but one still waits
    (d,) = executor.launched[3:]
    assert d.attempt == 1 and d.trial_id not in (a.trial_id, b.trial_id, c.trial_id)
    at_boundary(c, 2, 0.01, pauses=False)  # the best so far, and nobody waits behind step 2
    at_boundary(c, 4, 0.005, pauses=True)  # a and b wait at step 2: c lets them go on
    assert executor.launched[4:] == [AttemptRef(a.trial_id, 2)]  # the least advanced first
    resumed = service.storage.get_trial(a.trial_id)
    # its own checkpoint, its own params: a point where a replay of it reloads too
    first, again = resumed.schedule
    assert (again.step, again.parent, again.attempt) == (2, None, 2)
    assert first.params == again.params == resumed.params
    lineage = service.storage.lineage(a.trial_id).schedule
    assert [(s.step, s.trial_number) for s in lineage] == [(0, resumed.number), (2, resumed.number)]
    assert resumed.events[-2].detail.startswith("pbt: its turn again: resumes its own checkpoint")


def test_trials_streaming_a_finer_axis_take_turns_by_their_ranked_metric(
    service: StudyService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, with a loss per optimizer step beside the ranked metric per epoch (as
    text-classification reports): a trial paused at epoch 2 has a last step of 500, and was
    not counted as waiting behind epoch 4, so nobody yielded to it."""
    monkeypatch.setattr(pbt, "YIELD_GRACE_S", 0.0)
    run = launch(service, tmp_path, pbt_spec("axes"), place=False)
    executor, scheduler, (a, b) = run.executor, run.scheduler, run.refs
    for ref, loss in ((a, 0.1), (b, 0.05)):  # both pause at 2: two trials not started
        executor.place(ref)
        both = [MetricInput(500, "train_loss", 1.0), MetricInput(2, "loss", loss)]
        assert service.report(ref.trial_id, both) is True
        save(service, executor, ref, tmp_path, 2)
        executor.finish(ref)
        scheduler.tick()
    c, _ = executor.launched[2:]
    executor.place(c)
    assert report(service, c.trial_id, 2, 0.01) is False  # nobody waits behind epoch 2
    assert report(service, c.trial_id, 4, 0.005) is True  # a and b wait at epoch 2


def test_a_tie_copies_nothing(service: StudyService, tmp_path: Path) -> None:
    """Two trials with the same value at a boundary (a saturated accuracy): the one that got
    there last is in the bottom half, but copying an equal trial gains nothing."""
    first, second = launch(service, tmp_path, pair("ties")).refs
    for ref in (first, second):
        assert report(service, ref.trial_id, 2, 0.25) is False  # the second ties the first
    assert report(service, second.trial_id, 4, 0.5) is False  # nobody at 4 yet: goes on
    assert report(service, first.trial_id, 4, 0.25) is False  # better than second at 4
    assert report(service, second.trial_id, 6, 0.75) is False
    assert report(service, first.trial_id, 6, 0.9) is True  # worse, and second is better


@pytest.mark.parametrize(("max_steps", "copies"), [(None, True), (4, False)])
def test_no_trial_copies_at_its_last_step(
    service: StudyService, tmp_path: Path, max_steps: int | None, copies: bool
) -> None:
    """At ``scheduler.max_steps`` the trials end: the worse one does not pause to copy the
    better one's final checkpoint (that would only repeat its result, after a relaunch).
    Without ``max_steps`` the server cannot know that step 4 is the last one."""
    first, second = launch(service, tmp_path, pair("last", max_steps=max_steps)).refs
    assert report(service, first.trial_id, 2, 0.5) is False
    assert report(service, second.trial_id, 2, 0.4) is False  # better: goes on
    assert report(service, first.trial_id, 4, 0.1) is False  # nobody at 4 yet
    assert report(service, second.trial_id, 4, 0.9) is copies  # worse than first at 4


def test_perturbing_moves_small_integers_and_coarse_lattices() -> None:
    """x0.8 / x1.2 of 1, 2 or 32-on-a-16-lattice rounds back to the same value: it moves one
    lattice step instead, within the range."""
    space = {
        "layers": {"type": "int", "low": 1, "high": 8, "mutable": True},
        "batch": {"type": "int", "low": 16, "high": 128, "step": 16, "mutable": True},
        "lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True, "mutable": True},
    }
    spec = StudySpec.model_validate(pbt_spec("moves", space=space))
    seen = {"layers": set(), "batch": set()}
    for seed in range(40):
        params, how = explore(spec, {"layers": 2, "batch": 32, "lr": 0.1}, _rng(seed))
        for name in seen:
            if how[name] != "resampled":
                seen[name].add(params[name])
        assert spec.space["layers"].low <= params["layers"] <= spec.space["layers"].high
        assert params["batch"] % 16 == 0 and 16 <= params["batch"] <= 128
    assert seen == {"layers": {1, 3}, "batch": {16, 48}}
    assert isinstance(spec.space["layers"], IntParam)


def _rng(seed: int) -> object:
    import numpy as np

    return np.random.default_rng(seed)


def test_no_trial_yields_to_one_about_to_get_a_free_slot(
    service: StudyService, tmp_path: Path
) -> None:
    """Two trials, room for both: while one is paused to copy the other (its slot is free,
    the scheduler resumes it within a tick), the other passes boundaries without yielding;
    a trial not created yet counts only once none was created for the grace period."""
    good, bad = launch(service, tmp_path, pair("room")).refs
    assert report(service, good.trial_id, 2, 0.1) is False
    assert report(service, bad.trial_id, 2, 0.9) is True  # copies good: paused just now
    assert report(service, good.trial_id, 4, 0.05) is False  # bad is behind, but not waiting
    assert service.storage.get_trial(good.trial_id).state == "running"


def test_two_servers_promoting_one_paused_trial_at_once_copy_it_once(
    service: StudyService, db_url: str, tmp_path: Path
) -> None:
    """The bottom trial paused to copy the best and was released; two servers' schedulers
    ask the study at the same moment (a deposed leader that has not noticed yet, and the new
    one). One of them promotes it: one new attempt, one copied segment, one history entry;
    the other gets no trial (the population is complete)."""
    run = first_copy(service, tmp_path)
    worst = run.worst
    # what a scheduler's tick records (every checkpoint) and does when the pausing attempt
    # ends (release it), without the tick's own promotion
    for trial_id, path in run.paths.items():
        service.storage.set_checkpoint(trial_id, path)
    assert service.release_paused(worst.trial_id, worst.attempt)
    claimed, refused = asks_at_once(db_url, 2, run.study_id, dispatched=True)
    assert [(c.id, c.attempts) for c in claimed] == [(worst.trial_id, 2)], (claimed, refused)
    assert len(refused) == 1
    trial = service.storage.get_trial(worst.trial_id)
    assert trial.state == "running" and trial.attempts == 2
    assert len(trial.schedule) == 2 and trial.schedule[1].parent.trial_id == run.best.trial_id
    copies = [e for e in trial.events if "pbt exploit: copies" in (e.detail or "")]
    assert len(copies) == 1
    assert service.storage.get_study(run.study_id).n_trials == 4
    folder = Path(claimed[0].resume_from).parent  # the new attempt's folder: the one copy
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == ["checkpoint-000002"]


def test_a_promotion_that_lost_takes_back_its_copy(
    service: StudyService, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Server B copies the donor's checkpoint at step 2 for the paused trial; the donor saves
    step 4; server A copies that; B promotes the trial first. A's promotion does not happen,
    and its copy (step 4, newer) must not stay in the new attempt's folder: a retry of that
    attempt resumes from the newest checkpoint there, which must be B's copy."""
    from hpo.service import asking
    from hpo.service.db import make_engine
    from hpo.service.storage import Storage

    run = first_copy(service, tmp_path)
    worst, best = run.worst, run.best
    for trial_id, path in run.paths.items():
        service.storage.set_checkpoint(trial_id, path)
    assert service.release_paused(worst.trial_id, worst.attempt)
    took = {name: threading.Event() for name in "AB"}
    go = {name: threading.Event() for name in "AB"}
    take = asking.pbt.take

    def stepwise(*args: object, **kwargs: object) -> object:
        taken = take(*args, **kwargs)
        me = threading.current_thread().name
        took[me].set()
        assert go[me].wait(30)
        return taken

    monkeypatch.setattr(asking.pbt, "take", stepwise)
    engines = [make_engine(db_url) for _ in range(2)]
    claimed: dict[str, object] = {}

    def ask(name: str, engine: object) -> None:
        try:
            claimed[name] = StudyService(Storage(engine)).ask(run.study_id, dispatched=True)
        except Exception as exc:  # BudgetSpent for the one that lost
            claimed[name] = exc

    b = threading.Thread(target=ask, args=("B", engines[1]), name="B")
    b.start()
    assert took["B"].wait(30)  # B copied step 2
    step4 = save(service, run.executor, best, tmp_path, 4)
    service.storage.set_checkpoint(best.trial_id, step4)
    a = threading.Thread(target=ask, args=("A", engines[0]), name="A")
    a.start()
    assert took["A"].wait(30)  # A copied step 4
    go["B"].set()
    b.join(30)
    go["A"].set()
    a.join(30)
    for engine in engines:
        engine.dispose()
    won = claimed["B"]
    assert won.id == worst.trial_id and won.attempts == 2, claimed
    assert not hasattr(claimed["A"], "id"), claimed
    folder = Path(won.resume_from).parent
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-000002"]
    trial_dir = folder.parent
    assert checkpoints.candidates(trial_dir, before_attempt=3)[0] == Path(won.resume_from)
    assert service.storage.get_trial(worst.trial_id).schedule[1].step == 2
