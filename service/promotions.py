"""Paused trials and their promotion (ASHA's promotion variant, see
:mod:`hpo.service.pruners.asha`): which paused trial the next free slot resumes, and whether its
checkpoint can be resumed from.

Everything here reads inside a transaction the caller holds; the decision to promote is taken
again under the study's row lock by the one who promotes (``asking``), so two askers, or two
servers, never promote one trial twice nor one outside its rung's top ``floor(n/η)``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from hpo.service.db.models import Study
from hpo.service.pruners import make_pruner
from hpo.service.pruners.asha import AshaPruner, Promotion
from hpo.service.spec import StudySpec
from hpo.service.storage import metrics, studies, trials


def promotes(spec: StudySpec) -> bool:
    """Whether the study's trials pause at rungs and wait to be promoted."""
    if spec.scheduler is not None:  # pbt, replay: a trial that exploits pauses, then goes on
        return True
    return spec.pruner.type in ("asha", "hyperband") and spec.pruner.mode == "promotion"


def candidates(
    s: Session,
    study: Study,
    spec: StudySpec,
    *,
    settled_only: bool = False,
    final: bool = False,
) -> list[Promotion]:
    """The paused trials of the study that may be promoted now, best first (none unless the
    study promotes). ``settled_only``: only those whose pausing attempt has ended (what an
    asker may resume); without it, also those still saving their checkpoint (what keeps the
    study from completing). ``final``: the study hands out no new trial any more and none
    runs or waits (:func:`no_trial_to_come`), so no trial can reach a rung any more: the
    best paused trial of a rung goes on although fewer than η reached it (floor(n/η) is 0
    there): else a study whose top rungs hold fewer than η trials ended with every trial
    paused and none complete (ASHA: 20 trials, η 3, max_steps 27; Hyperband too, where
    max_steps/min_steps is no power of η or its last bracket holds few trials)."""
    if not promotes(spec):
        return []
    paused = trials.paused(s, study.id, settled_only=settled_only)
    if not paused:
        return []
    if spec.scheduler is not None:
        # pbt: the trials not created yet start first, then the paused ones go on, the least
        # advanced first (so a population larger than the cluster takes turns); a replay's
        # paused trials go on at once, in the same order
        if settled_only and spec.pbt is not None and study.next_number < spec.pbt.population:
            return []
        reasons = trials.pause_reasons(s, list(paused))
        order = sorted(paused, key=lambda t: (paused[t], t))
        return [Promotion(t, 0, reasons.get(t) or {}) for t in order]
    pruner = make_pruner(spec)
    assert isinstance(pruner, AshaPruner)
    numbers = trials.numbers(s, list(paused))
    out: list[Promotion] = []
    for bracket in sorted({pruner.bracket_of(n) for n in numbers.values()}):
        mine = {t: last for t, last in paused.items() if pruner.bracket_of(numbers[t]) == bracket}
        peers = None if pruner.n_brackets == 1 else (pruner.n_brackets, bracket)
        rungs = pruner.rungs(max(mine.values()), bracket)
        values = {
            rung: metrics.values_at_by_trial(s, study.id, pruner.metric, rung, peers)
            for rung in rungs
        }
        out += pruner.promotion_order(mine, values, bracket, final=final)
    # across brackets too: the highest rung (in steps) first, then the best value
    sign = -1 if pruner.direction == "maximize" else 1
    out.sort(key=lambda p: (-p.reason["step"], sign * p.reason["value"], p.trial_id))
    return out


def no_trial_to_come(s: Session, study: Study, numbers_spent: bool) -> bool:
    """Whether no trial can reach a rung any more: the study's trial numbers are spent
    (``numbers_spent``, its caller's to say) and none of its trials runs or waits."""
    return numbers_spent and studies.count_active(s, study.id) == (0, 0)


def rung_values(
    s: Session, study: Study, spec: StudySpec
) -> dict[int, dict[int, tuple[dict[str, Any], float]]]:
    """``{rung step: {trial number: (its params, its value there)}}`` of every trial that
    reached each rung of the study's ASHA/Hyperband pruner (the steps ``min_steps * η**k``
    of every bracket, and ``max_steps``), up to the highest rung any trial reached: what BOHB
    fits TPE on."""
    pruner = make_pruner(spec)
    assert isinstance(pruner, AshaPruner)
    opts = spec.pruner
    by_id: dict[int, dict[int, float]] = {}
    step = opts.min_steps
    while True:  # up the rungs while some trial reached them (max_steps: the last one)
        if opts.max_steps is not None:
            step = min(step, opts.max_steps)
        values = metrics.values_at_by_trial(s, study.id, pruner.metric, step)
        if not values:
            break  # nothing reached it, nor any higher rung
        by_id[step] = values
        if step == opts.max_steps:
            break
        step *= opts.reduction_factor
    known = trials.numbered_params(s, {t for values in by_id.values() for t in values})
    return {
        step: {known[t][0]: (known[t][1], v) for t, v in values.items() if t in known}
        for step, values in by_id.items()
    }


def resume_point(checkpoint: str | None, paused_at: int | None) -> str | None:
    """The checkpoint a promoted trial resumes from: the one its attempt saved at
    ``paused_at`` (the last step of the ranked metric stored when it paused) when it is
    there, else the newest recorded. An attempt told to pause late (the answer came after it
    had run on) saved a newer checkpoint whose points were dropped; resuming from it would
    leave a gap in the curve. (Not the trial's ``last_step``: a trainable may stream other
    metrics on a finer axis, e.g. a loss per optimizer step beside validation per epoch.)"""
    if checkpoint is None or paused_at is None:
        return checkpoint
    from hpo.workers import checkpoints

    folder = checkpoint.rstrip("/").rpartition("/")[0]
    if not folder or checkpoints.step_of(checkpoint) == paused_at:
        return checkpoint
    at_pause = checkpoints.beside(checkpoint, paused_at)
    return at_pause if checkpoint_problem(at_pause) is None else checkpoint


def checkpoint_problem(path: str | None) -> str | None:
    """Why a paused trial cannot resume from ``path`` (missing, or not readable as a
    checkpoint), or None. Reads ``meta.json`` and the archive directory of ``state.pt``, not
    the tensors: the control plane does not load the model."""
    if path is None:
        return "it paused without saving a checkpoint"
    from hpo.workers import storage

    where = storage.location(path)
    try:
        if isinstance(where, Path):
            meta = json.loads((where / "meta.json").read_text())
            state = where / "state.pt"
            if not zipfile.is_zipfile(state):
                return f"its checkpoint {path} is unreadable: state.pt is not a torch archive"
            with zipfile.ZipFile(state) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"its checkpoint {path} is unreadable: {bad} in state.pt is corrupt"
        else:
            fs, key = storage.filesystem(where)
            meta = json.loads(fs.cat_file(f"{key}/meta.json"))
            if not fs.exists(f"{key}/state.pt"):
                return f"its checkpoint {path} is missing state.pt"
    except FileNotFoundError as exc:
        return f"its checkpoint {path} is missing ({exc.filename or exc})"
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        return f"its checkpoint {path} is unreadable: {exc}"
    if not isinstance(meta, dict) or "step" not in meta:
        return f"its checkpoint {path} is unreadable: meta.json names no step"
    return None
