"""Population based training (Jaderberg et al., 2017) on the pause/promote machinery.

``scheduler: {type: pbt, population: N, interval_steps: K, ...}`` runs N trials. When a trial
reports a step that crosses a multiple of K (a *boundary*), its value there is ranked among
the values the other trials had at that boundary. In the bottom ``quantile`` (and with at
least one other trial there) it *exploits*: it pauses (its attempt ends and frees its
workers, as an ASHA pause does), naming a trial of the top ``quantile`` chosen at random.
The next free slot resumes it at once (:func:`exploit`): with that trial's newest checkpoint
(weights, optimizer, LR schedule: whatever the trainable saves) and its parameters, the
``mutable`` ones *explored* (each resampled from the space with probability ``resample_p``,
else multiplied by one of ``perturb`` and kept in range; a categorical one moves to a
neighbouring choice). The trial keeps its number and is not a new trial for the budget; it
continues from the copied checkpoint's step. Every decision is in the trial's event history,
and its parameters over its steps are its ``schedule`` (each segment with its parent).

A population larger than the cluster takes turns: a trial that crosses a boundary and is not
copying another *yields* (pauses) when trials wait for a slot short of that boundary (not
created yet, or paused at an earlier step); the trials not created yet start first, then the
paused ones resume, the least advanced first (:func:`hpo.service.promotions.candidates`).

Every random choice is seeded by the study's seed, the trial number and the boundary, so a
decision taken again (a replayed report, a restarted server) is the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from hpo.service.db.models import Trial, TrialParam
from hpo.service.promotions import checkpoint_problem
from hpo.service.pruners.base import PauseDecision, Pruner, PruningHistory, Report
from hpo.service.spec import CategoricalParam, FloatParam, IntParam, StudySpec, lattice_point
from hpo.workers import storage

# How long a trial must have waited for a slot (paused, or not created yet) before a trial at
# a boundary yields its own: the scheduler gives a free slot to a waiting trial within a tick
# or two, and yielding to one that is about to run anyway only costs a relaunch.
YIELD_GRACE_S = 5.0


class PbtPruner(Pruner):
    """The exploit decision of PBT, as a pruner that only ever pauses (see the module)."""

    def judge(self, report: Report, history: PruningHistory) -> PauseDecision | None:
        pbt = self.spec.pbt
        assert pbt is not None
        k = pbt.interval_steps
        before = report.previous_step or 0
        if report.step // k == before // k:
            return None  # no boundary crossed
        if pbt.max_steps is not None and report.step >= pbt.max_steps:
            return None  # its last step: it ends, and nothing waits for its slot any more
        boundary = (report.step // k) * k
        others = history.values_by_trial_at(boundary)
        exploit = self._exploit(report, boundary, others) if others else None
        if exploit is not None:
            return exploit
        # More trials than slots: take turns, so the population trains side by side. A trial
        # paused (or not created) moments ago is about to get a free slot: not waiting.
        behind = history.waiting_behind(boundary, pbt.population, YIELD_GRACE_S)
        if behind:
            return PauseDecision(
                {
                    "pruner": "pbt",
                    "action": "yield",
                    "metric": self.metric,
                    "value": report.value,
                    "step": report.step,
                    "boundary": boundary,
                    "behind": behind,
                }
            )
        return None

    def _exploit(
        self, report: Report, boundary: int, others: dict[int, float]
    ) -> PauseDecision | None:
        pbt = self.spec.pbt
        assert pbt is not None
        ranked = sorted(others.items(), key=lambda tv: (self._key(tv[1]), tv[0]))
        n = len(ranked) + 1
        tail = min(max(1, math.ceil(n * pbt.quantile)), n // 2)
        # The trial's rank among n (0: best); ties go to the trials that got there first.
        rank = sum(1 for _, v in ranked if not self.better(report.value, v))
        if rank < n - tail:
            return None
        # only a better trial is worth copying (ties, e.g. a saturated accuracy, are not)
        top = [t for t, v in ranked[:tail] if self.better(v, report.value)]
        if not top:
            return None
        rng = np.random.default_rng(seed_of(self.spec, report.number, boundary))
        donor = int(top[int(rng.integers(len(top)))])
        return PauseDecision(
            {
                "pruner": "pbt",
                "action": "exploit",
                "metric": self.metric,
                "value": report.value,
                "step": report.step,
                "boundary": boundary,
                "rank": rank + 1,
                "of": n,
                "bottom": tail,
                "threshold": ranked[n - tail - 1][1] if n - tail - 1 < len(ranked) else None,
                "donor_trial_id": donor,
                "donor_value": others[donor],
            }
        )

    def _key(self, value: float) -> float:
        return value if self.direction == "minimize" else -value


def seed_of(spec: StudySpec, number: int, boundary: int) -> list[int]:
    base = spec.sampler.seed
    return [base if base is not None else 0, number, boundary]


def explore(
    spec: StudySpec, params: dict[str, Any], rng: np.random.Generator
) -> tuple[dict[str, Any], dict[str, str]]:
    """``params`` with each mutable parameter resampled or perturbed; returns them and what
    was done to each (``"resampled"``, ``"x1.2"``, ``"-> choice"``)."""
    pbt = spec.pbt
    assert pbt is not None
    out, how = dict(params), {}
    for name, param in spec.space.items():
        if not param.mutable or name not in out:
            continue
        if rng.random() < pbt.resample_p:
            out[name], how[name] = _sample(param, rng), "resampled"
        elif isinstance(param, CategoricalParam) or getattr(param, "values", None) is not None:
            choices = list(param.choices if isinstance(param, CategoricalParam) else param.values)
            i = choices.index(out[name]) if out[name] in choices else 0
            j = min(len(choices) - 1, max(0, i + (1 if rng.random() < 0.5 else -1)))
            out[name], how[name] = choices[j], f"-> {choices[j]!r}"
        else:
            factor = pbt.perturb[int(rng.integers(2))]
            out[name], how[name] = _scaled(param, out[name], factor), f"x{factor:g}"
    return out, how


def _sample(param: FloatParam | IntParam | CategoricalParam, rng: np.random.Generator) -> Any:
    if isinstance(param, CategoricalParam):
        return param.choices[int(rng.integers(len(param.choices)))]
    if param.values is not None:
        return list(param.values)[int(rng.integers(len(param.values)))]
    low, high = float(param.low), float(param.high)
    x = (
        math.exp(rng.uniform(math.log(low), math.log(high)))
        if param.log
        else rng.uniform(low, high)
    )
    return _scaled(param, x, 1.0)


def _scaled(param: FloatParam | IntParam, value: Any, factor: float) -> Any:
    """``value * factor`` within the parameter's range and on its lattice (an int's lattice
    is 1 unless it has a ``step``). A change that rounds back to ``value`` moves one lattice
    step in the factor's direction instead, so small integers and coarse lattices still move
    (as far as the range allows)."""
    low, high = float(param.low), float(param.high)
    step = param.step if param.step is not None else (1 if isinstance(param, IntParam) else None)
    x = min(high, max(low, float(value) * factor))
    if step is not None:
        step = float(step)
        k = round((x - low) / step)
        if factor != 1.0 and math.isclose(lattice_point(low, step, k), float(value)):
            k = round((float(value) - low) / step) + (1 if factor > 1 else -1)
        last = math.floor((high - low) / step + 1e-9)  # the lattice's last point
        x = lattice_point(low, step, min(last, max(0, k)))
    if isinstance(param, IntParam):
        return round(x)
    return x


@dataclass(frozen=True)
class Copy:
    """The checkpoint a paused PBT trial is to copy: ``path`` (None: nothing to copy, then
    ``problem`` says why), the donor, and the step the checkpoint holds."""

    path: str | None = None
    donor_id: int | None = None
    step: int | None = None
    problem: str | None = None
    source: str | None = None  # the donor's own checkpoint (``path`` may be a copy of it)


def donor_checkpoint(s: Session, spec: StudySpec, reason: dict[str, Any] | None) -> Copy:
    """The newest checkpoint of the trial a paused PBT trial named (read before the write
    lock: it reads the checkpoint's files); an empty Copy for other studies."""
    if spec.pbt is None or not reason or reason.get("donor_trial_id") is None:
        return Copy()
    donor_id = int(reason["donor_trial_id"])
    donor = s.get(Trial, donor_id)
    number = reason.get("donor_number", donor_id)
    path = None if donor is None else donor.checkpoint
    from hpo.workers import checkpoints

    step = checkpoints.step_of(path) if path else None
    last = spec.pbt.max_steps
    if path and step is not None and last is not None and step >= last:
        # The donor ran on to its last step while this trial waited: a copy of that would
        # end at once with the donor's result. Its checkpoint at the boundary, if kept.
        boundary = int(reason.get("boundary", 0))
        path = checkpoints.beside(path, boundary)
        step = boundary
        if checkpoint_problem(path) is not None:
            return Copy(
                donor_id=donor_id,
                problem=f"could not copy trial #{number}: it reached its last step "
                f"({last}) and its checkpoint at step {boundary} is gone",
            )
    problem = checkpoint_problem(path)
    if problem is not None:
        return Copy(donor_id=donor_id, problem=f"could not copy trial #{number}: {problem}")
    if step is None:
        step = donor.last_step if donor else None
    return Copy(path, donor_id, step, source=path)


def take(copy: Copy, own_checkpoint: str | None, attempt: int) -> Copy:
    """Copy the donor's checkpoint into the folder of the trial's next attempt (``attempt``):
    the donor goes on saving and keeps only its newest checkpoints, so the path it named may
    be gone by the time the workers load it; and a retry of that attempt resumes from the
    newest checkpoint in the trial's own folders, which is then this copy (not the trial's
    state from before it copied). Without a checkpoint of its own (no folder known), the
    donor's path is used as it is. A copy that fails is a ``problem`` (nothing is copied)."""
    if copy.path is None or own_checkpoint is None:
        return copy
    from hpo.workers import checkpoints

    trial_dir = own_checkpoint.rstrip("/").rsplit("/", 2)[0]
    try:
        path = checkpoints.copy(copy.path, storage.join(trial_dir, f"attempt-{attempt}"))
    except Exception as exc:  # a file system or object store error: do not copy
        return Copy(donor_id=copy.donor_id, problem=f"could not copy its checkpoint: {exc}")
    return Copy(str(path), copy.donor_id, copy.step, source=copy.source)


def discard(taken: Copy, trial: Trial | None, attempt: int) -> None:
    """A promotion that did not happen takes back the copy :func:`take` made (``taken``) into
    the folder of the trial's attempt ``attempt``: a retry of that attempt resumes from the
    newest checkpoint there, which must be the one the attempt was given. Kept when the
    promotion that did happen made the same copy (the same attempt, from the same step: the
    pause names one donor). ``trial``: as it is now."""
    assert taken.path is not None
    same = trial is not None and trial.attempts == attempt and copied_at(trial) == taken.step
    if not same:
        from hpo.workers import checkpoints

        checkpoints.remove(taken.path)


def copied_at(trial: Trial) -> int | None:
    """The step of the checkpoint a PBT trial last copied (its schedule's newest segment with
    a parent), or None."""
    for segment in reversed(trial.schedule or []):
        if segment.get("parent"):
            return int(segment["step"])
    return None


def exploit(
    s: Session, spec: StudySpec, trial: Trial, copy: Copy, resume_from: str | None
) -> dict[str, Any]:
    """Under the study's lock, as the paused ``trial`` is promoted: give it the donor's
    parameters, explored, and add the segment that starts at the copied step to its schedule
    (with its own start as the first segment, on its first change). Without a checkpoint to
    copy (a yield, or a donor that cannot be copied) it goes on from its own checkpoint
    ``resume_from`` with its parameters, also a segment: a replay of its lineage reloads
    there too. Returns the promotion's reason for its history."""
    reason = dict(trial.pause_reason or {})
    trial.pause_reason = None
    if copy.path is None or copy.donor_id is None:
        own = {p.name: p.value for p in trial.params}
        segment = resumed_segment(trial, resume_from, own)
        change_params(trial, segment)
        return {**reason, "segment": segment, "note": copy.problem}
    donor = s.get(Trial, copy.donor_id)
    assert donor is not None  # it had a checkpoint a moment ago; trials are never deleted alone
    donor_params = {p.name: p.value for p in donor.params}
    boundary = int(reason.get("boundary", 0))
    rng = np.random.default_rng([*seed_of(spec, trial.number, boundary), 1])
    params, how = explore(spec, donor_params, rng)
    step = copy.step or 0
    from hpo.workers import checkpoints

    # The attempts say which checkpoint held what (hpo.service.replay.lineage): this segment
    # begins the trial's next attempt, from a checkpoint the donor's attempt wrote.
    parent = {"trial_id": donor.id, "number": donor.number, "step": step}
    parent["attempt"] = checkpoints.attempt_of(copy.source) if copy.source else None
    segment = {
        "step": step,
        "params": params,
        "parent": parent,
        "perturbed": how,
        "attempt": trial.attempts + 1,
    }
    # It goes on from the copy's step. Steps past its own were trained, and charged to
    # budget.max_steps, in the trial it copied: not charged again.
    skipped = step - (trial.last_step or 0)
    if skipped > 0:
        trial.steps_copied = (trial.steps_copied or 0) + skipped
        trial.last_step = step
    change_params(trial, segment)
    return {**reason, "segment": segment}


def resumed_segment(trial: Trial, checkpoint: str | None, params: dict[str, Any]) -> dict[str, Any]:
    """The segment of a trial whose next attempt resumes its own ``checkpoint`` with
    ``params``: from the checkpoint's step (else its last step), naming the attempt that
    wrote it (``from_attempt``), which :func:`hpo.service.replay.lineage` follows."""
    from hpo.workers import checkpoints

    step = checkpoints.step_of(checkpoint) if checkpoint else None
    return {
        "step": trial.last_step or 0 if step is None else step,
        "params": params,
        "parent": None,
        "perturbed": {},
        "attempt": trial.attempts + 1,
        "from_attempt": checkpoints.attempt_of(checkpoint) if checkpoint else None,
    }


def change_params(trial: Trial, segment: dict[str, Any]) -> None:
    """Append ``segment`` (its ``params`` from its ``step`` on) to the trial's schedule, with
    the trial's own start as the first segment on its first change, and give it those
    parameters."""
    schedule = list(trial.schedule or [])
    if not schedule:
        own = {p.name: p.value for p in trial.params}
        schedule.append({"step": 0, "params": own, "attempt": 1})
    trial.schedule = [*schedule, segment]
    by_name = {p.name: p for p in trial.params}
    for name, value in segment["params"].items():
        if name in by_name:
            by_name[name].value = value
        else:
            trial.params.append(TrialParam(name=name, position=len(trial.params), value=value))
