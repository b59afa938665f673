"""Metric reports: points stored exactly once per attempt, the lease renewed, the pruner asked.

``StudyService.report`` and ``heartbeat`` call :func:`report`; :func:`fence` is the check
every trial write makes that it comes from the trial's current attempt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hpo.service import attempts, pbt, transitions
from hpo.service.attempts import AttemptToken
from hpo.service.db.models import Study, Trial, utcnow
from hpo.service.errors import Conflict, InvalidInput, TrialFinished
from hpo.service.pruners import make_pruner
from hpo.service.pruners.base import PauseDecision, Report
from hpo.service.records import MetricInput
from hpo.service.states import StudyState, TrialState
from hpo.service.storage import Storage, metrics, studies, trials

# Metric points stored per commit: a commit of 1,000 points holds SQLite's write lock for a
# few milliseconds; one of 10,000 (the batch cap) held it long enough to stall other studies.
POINTS_PER_COMMIT = 1_000
# How long a report's write waits for a PostgreSQL row lock (its study's, its trial's) before
# it answers "the database is busy" (HTTP 503, Retry-After) with that commit rolled back: a
# row held by a transaction that does not end (a stopped second server, a psql session) must
# not keep reports, which run on a pool of 8 threads (hpo.api.pools.REPORTS), waiting for
# ever. Longer than a busy study's lock queue (p99 ~2 s with 64 trials reporting flat out).
# SQLite's busy timeout (3 s) bounds its writers already.
REPORT_LOCK_TIMEOUT_S = 5.0


def report(
    storage: Storage,
    trial_id: int,
    points: Sequence[MetricInput],
    *,
    token: AttemptToken | None = None,
    attempt: int | None = None,
    unnamed_first_only: bool = False,
) -> bool:
    """Store metric points of a running trial, renew its lease and consult the pruner.

    Each point is stored once per attempt (a batch sent again stores nothing new). The
    pruner's questions about the other trials are answered first, before any lock is taken
    (in a read transaction of their own; on PostgreSQL at the start of the report's one
    transaction, see :func:`_store_then_lock`): they were the slow part, and all trials of
    a study queued behind them on its row. The write that follows is short: it checks the
    attempt again under the lock, stores the points and applies the verdict (one to prune
    only when the steps to judge are still those it was given on, else the pruner is asked
    again there). A large batch is stored in commits of at most POINTS_PER_COMMIT points, so
    no commit holds SQLite's write lock for long; the lease and the pruner's verdict follow
    in one short commit of their own. A report made with an attempt's ``token``, or naming an
    ``attempt``, is refused with StaleAttempt unless that attempt is current (see
    :func:`fence` for ``unnamed_first_only``); nothing of a refused batch stays stored,
    even when an earlier commit of it was accepted (unless a resend of the batch stored the
    rest of it meanwhile: see :func:`_take_back`). On PostgreSQL a commit waits at most
    REPORT_LOCK_TIMEOUT_S for a row lock, then raises DatabaseUnavailable (the commits of the
    batch before it stay, as with any database failure between them); there, a batch of one
    commit is reported in one transaction, and with a verdict to continue in a study without
    a compute budget (the usual report) its points are written before the study's row is
    locked (:func:`_store_then_lock`). Returns whether the trial should stop (pruned, paused
    at a rung, or its study stopped). Raises TrialFinished for a trial that completed or
    failed, InvalidInput for NaN/inf.
    """
    for i, p in enumerate(points):
        if not math.isfinite(p.value):
            raise InvalidInput(
                f"points[{i}].value must be a finite number, got {p.value}",
                field=f"points[{i}].value",
            )
    fencing: dict[str, Any] = {
        "token": token,
        "attempt": attempt,
        "unnamed_first_only": unnamed_first_only,
    }
    if points and len(points) <= POINTS_PER_COMMIT and storage.dialect != "sqlite":
        answer = _store_then_lock(storage, trial_id, points, fencing)
        if answer is not None:
            return answer
    verdict: _Verdict | None = None
    if points:
        with storage.read() as s:
            study, trial = _running(s, trial_id, lock=False, **fencing)
            if trial is None:
                return True
            kept = after_pause(study, trial, points)
            judged = _to_judge(s, study, trial, kept)
            verdict = _Verdict(judged, _judge(s, study, trial, kept, judged))
    size = POINTS_PER_COMMIT
    chunks = [points[i : i + size] for i in range(0, len(points), size)]
    inserted: list[int] = []  # ids this batch stored in its earlier commits
    last_step_before: int | None = None  # the trial's, before its first commit
    attempt_no = 0  # the attempt the earlier commits stored under
    done = 0  # how many of the points the earlier commits got to
    try:
        for chunk in chunks[:-1]:
            with storage.write(lock_timeout_s=REPORT_LOCK_TIMEOUT_S) as s:
                study, trial = _running(s, trial_id, **fencing)
                if trial is None:
                    return True
                if not inserted:
                    last_step_before = trial.last_step
                attempt_no = trial.attempts
                if _stale(verdict):
                    verdict = _recheck(s, study, trial, after_pause(study, trial, points), verdict)
                kept, cut = _within_budget(s, study, trial, after_pause(study, trial, chunk))
                inserted += _store_points(s, trial, kept, utcnow(), ids=True)
                done += len(chunk)
                if cut is not None:
                    _spend_last_steps(s, study, trial, kept, cut)
                    return True
        return _finish_report(storage, trial_id, points, chunks, verdict, fencing)
    except Conflict:
        if inserted:  # a later commit was refused: the batch is all or nothing
            with storage.write() as s:
                _take_back(s, trial_id, inserted, last_step_before, points[done:], attempt_no)
        raise


class _Undo(Exception):
    """Leaves a write transaction rolled back (what it stored must not stay), so that
    :func:`report`'s usual path decides."""


def _store_then_lock(
    storage: Storage, trial_id: int, points: Sequence[MetricInput], fencing: dict[str, Any]
) -> bool | None:
    """A report of one commit's points on PostgreSQL, in one transaction that holds the
    study's row only at its end when it can.

    The pruner is asked first: no row is locked yet, so this is the read transaction of
    :func:`report`'s usual path. When its verdict is to continue and the study has no
    compute budget (the usual report), nothing else needs the study's row until the lease
    and the curves' cursor are written: the points and the curves at rest (the slow part of
    a report: ~8 of its ~11 ms under the lock with 320 points) are written under the attempt
    that read found running, then one statement locks the study's row and moves the trial on
    (:func:`hpo.service.storage.trials.note_points`), checking on the rows as the lock finds
    them that the trial still runs that attempt and the study is neither stopped nor given a
    budget, and the commit follows: the row is held for that statement and the commit only.
    When the trial moved on in between (another attempt, no longer running, its study
    stopped, a budget added to the spec), the transaction is rolled back, so nothing of it
    stays, and the usual path decides: fenced as before, the row held far shorter. A verdict
    to prune or pause, or a budget, takes the row first and goes on as the usual path's last
    commit does (:func:`_finish`), in the same transaction.

    A trial deleted while the report waits for its curve rows fails the new curve rows'
    foreign key (its curve rows went with it, so they are inserted again; IntegrityError):
    rolled back, and the usual path answers TrialNotFound. A delete that comes after the
    report holds its curve rows waits for them, and meets the report in a deadlock (below).

    Lock order: the trial's curve rows (and its row, shared by the new curve rows'
    foreign-key checks), then its study's row. A writer that holds a study's row and then folds that
    study's curves or deletes its trials (another report of the same trial that takes the
    row first, a batch taken back, a study being deleted) can meet such a report in a
    deadlock; PostgreSQL then ends one of the two (503, retried; nothing stored). When it is
    a batch being taken back, its earlier commits stay, as after any database failure between
    them (see :func:`report`). A delete stops the study first, so that only a report already
    under way can meet it, and is tried again when it is the one ended
    (``StudyService.delete_study``). The curves' foreign-key checks share only their own
    trial's row (``FOR KEY SHARE``): the points have no foreign key (migrations 0013 and
    0015) and the curves none to ``studies``, so concurrent reports of one study do not share
    its row, which PostgreSQL would record as MultiXacts, and a report of 330 points runs
    no check for each of them.

    Returns whether the trial should stop, or None when the usual path must decide.
    """
    try:
        with storage.write(lock_timeout_s=REPORT_LOCK_TIMEOUT_S) as s:
            study, trial = _running(s, trial_id, lock=False, **fencing)
            if trial is None:
                return True  # nothing was written
            if len(after_pause(study, trial, points)) < len(points):
                raise _Undo  # the usual path leaves those points out
            judged = _to_judge(s, study, trial, points)
            verdict = _Verdict(judged, _judge(s, study, trial, points, judged))
            if verdict.decision is not None or _budgeted(study):
                s.expire_all()  # read again under the lock
                return _finish(s, trial_id, points, points, verdict, fencing)
            metrics.add(s, trial, points, utcnow(), ids=False)
            last_step = max(p.step for p in points)
            lease_s = transitions.spec_of(study).lease_s
            # the clock read again: the waits for the rows above may have taken a while (and
            # note_points adds its own wait for the study's row)
            if not trials.note_points(s, trial, last_step, lease_s, utcnow()):
                raise _Undo  # the usual path reads the rows and says why
            return False
    except _Undo:
        return None
    except IntegrityError:  # the curves' foreign key: the trial was deleted meanwhile,
        return None  # and the usual path says so (404)


def _budgeted(study: Study) -> bool:
    """Whether the study has a compute budget (its reports are checked against it)."""
    budget = transitions.spec_of(study).budget
    return budget.max_steps is not None or budget.max_worker_seconds is not None


def _take_back(
    s: Session,
    trial_id: int,
    ids: list[int],
    last_step_before: int | None,
    rest: Sequence[MetricInput],
    attempt_no: int,
) -> None:
    """Undo the earlier commits of a batch refused in a later one: its points, its curves,
    and the ``last_step`` they moved the trial to (back to the highest of: the trial's before
    the batch, its points that stay, a checkpoint it copied meanwhile), so ``budget.max_steps``
    is not charged for them.

    Unless the ``rest`` of the batch (the points this request did not get to store) is all
    stored, by rows inserted after this request's first ones: then a resend of the batch
    (the client timed out on this request and sent it again, to this server or another)
    stored it, and was accepted in the same commit as its last points, relying on the rows
    this request had inserted; taking them back would leave a gap in an accepted batch. The
    rows stay, and so does the ``last_step`` they moved the trial to. Not recognised: a
    resend of only part of the batch (its rows are taken back), and a resend larger than the
    batch that stores the rest but is refused in a later commit of its own (this request's
    rows stay)."""
    study, trial = trials.lock(s, trial_id, params=False)
    if metrics.stored_since(s, trial_id, attempt_no, rest, ids):
        return
    metrics.take_back(s, trial, ids)
    kept = [last_step_before, metrics.max_step(s, trial_id), pbt.copied_at(trial)]
    trial.last_step = max((step for step in kept if step is not None), default=None)
    studies.touch_curves(study, trial)


class _Verdict:
    """The steps a report judges (each with the step before it) and the pruner's decision on
    them; ``checked`` once the steps were confirmed under the write lock."""

    def __init__(self, judged: dict[int, int | None], decision: Any) -> None:
        self.judged = judged
        self.decision = decision
        self.checked = False


def _stale(verdict: _Verdict | None) -> bool:
    """Whether the write must ask :func:`_recheck` first: there is no verdict yet, or it is to
    prune and was not confirmed under the lock. A verdict to continue needs no check: steps
    stored meanwhile by another report of this trial could only shrink the steps to judge
    (and the rungs between them), and a trial that passed on more steps passes on fewer."""
    return verdict is None or (verdict.decision is not None and not verdict.checked)


def _recheck(
    s: Session,
    study: Study,
    trial: Trial,
    points: Sequence[MetricInput],
    verdict: _Verdict | None,
) -> _Verdict:
    """The verdict to apply, under the write lock and before the points are stored: the one
    given in the read transaction when the steps to judge are still the same (nothing of this
    trial was stored in between), else the pruner asked again on the steps as they are now
    (so each new step is judged once, by the report that stores it)."""
    judged = _to_judge(s, study, trial, points)
    if verdict is None or verdict.judged != judged:
        verdict = _Verdict(judged, _judge(s, study, trial, points, judged))
    verdict.checked = True
    return verdict


def _finish_report(
    storage: Storage,
    trial_id: int,
    points: Sequence[MetricInput],
    chunks: list[Sequence[MetricInput]],
    verdict: _Verdict | None,
    fencing: dict[str, Any],
) -> bool:
    """The last commit of :func:`report`: its last chunk of points, the lease, the pruner."""
    with storage.write(lock_timeout_s=REPORT_LOCK_TIMEOUT_S) as s:
        return _finish(s, trial_id, points, chunks[-1] if chunks else [], verdict, fencing)


def _finish(
    s: Session,
    trial_id: int,
    points: Sequence[MetricInput],
    last: Sequence[MetricInput],
    verdict: _Verdict | None,
    fencing: dict[str, Any],
) -> bool:
    """The last commit's work, in ``s``: the study's row locked and the trial fenced, the
    report's ``last`` chunk of points stored, the lease renewed, the verdict applied."""
    study, trial = _running(s, trial_id, **fencing)
    if trial is None:
        return True
    spec = transitions.spec_of(study)
    now = utcnow()
    if not points:
        trials.renew_lease(trial, spec.lease_s, now)
        return False  # a heartbeat: the lease is renewed, nothing else changed
    new = after_pause(study, trial, points)  # (checked again under the lock)
    if len(new) < len(points) and spec.progress_timeout_s:
        # steps trained again up to where the trial paused: no point is stored, but the
        # attempt makes progress, and its progress deadline moves as a new point's would
        trial.progress_expires_at = now + timedelta(seconds=spec.progress_timeout_s)
    if not new:
        trials.renew_lease(trial, spec.lease_s, now)
        return False
    if _stale(verdict):
        verdict = _recheck(s, study, trial, new, verdict)
    kept, cut = _within_budget(s, study, trial, after_pause(study, trial, last))
    _store_points(s, trial, kept, now, ids=False)
    # after the queries above: one UPDATE of the trial's row with its last_step at commit
    trials.renew_lease(trial, spec.lease_s, now)
    if cut is not None:
        _spend_last_steps(s, study, trial, kept, cut)
        return True
    decision = verdict.decision
    if isinstance(decision, PauseDecision):  # at a rung: checkpoint, free the workers
        transitions.pause(s, study, trial, decision.reason, now=now)
        return True
    if decision is not None:
        trial.pruned = decision.reason
        watched = decision.reason.get("value")
        if decision.reason.get("metric") != spec.objectives[0].metric:
            # the pruner watches another metric (acc while the objective is loss): the value
            # is the objective's last report, as for a trial told pruned
            vals = transitions.last_watched_value(s, trial, spec)
        else:
            vals = [watched] if watched is not None and not spec.multi_objective else None
        transitions.finish(s, study, trial, TrialState.PRUNED, vals, None, now=now)
        return True
    studies.touch_curves(study, trial)  # new points: the study's own ETag holds
    return False


def _within_budget(
    s: Session, study: Study, trial: Trial, points: Sequence[MetricInput]
) -> tuple[Sequence[MetricInput], str | None]:
    """The points that fit in ``budget.max_steps`` (read under the study's lock, so reports of
    concurrent trials never overrun it together), and the budget (its spec field) that stops
    the trial when some do not fit or ``budget.max_worker_seconds`` is spent (else None)."""
    if not points or not _budgeted(study):
        return points, None
    budget = transitions.spec_of(study).budget
    seconds = budget.max_worker_seconds
    if seconds is not None and trials.worker_seconds_used(s, study, utcnow()) >= seconds:
        return [], "budget.max_worker_seconds"
    if budget.max_steps is None:
        return points, None
    # the trial's own charge for step n is n less the steps it skipped by copying (PBT)
    allowed = budget.max_steps - trials.steps_used(s, study.id, besides=trial.id)
    allowed += trial.steps_copied or 0
    kept = [p for p in points if p.step <= allowed]
    if len(kept) == len(points):
        return points, None
    return kept, "budget.max_steps"


def _spend_last_steps(
    s: Session, study: Study, trial: Trial, kept: Sequence[MetricInput], cut: str
) -> None:
    """The trial reached the study's ``budget.max_steps`` (or its compute is used up): keep
    what fits, prune it after the last step kept (steps reported every n may stop short of
    the budget's last step)."""
    trial.last_step = max(trial.last_step or 0, *(p.step for p in kept), 0) or None
    spec = transitions.spec_of(study)
    s.flush()
    transitions.finish(
        s,
        study,
        trial,
        TrialState.PRUNED,
        transitions.last_watched_value(s, trial, spec),
        None,
        detail=f"{cut} ({transitions.compute_limit(spec, cut):g}) spent: "
        f"stopped at step {trial.last_step or 0}",
    )


def after_pause(study: Study, trial: Trial, points: Sequence[MetricInput]) -> Sequence[MetricInput]:
    """The points a trial resumed from a pause (promoted at a rung) may store: none of the
    metric its pruner ranks (``pruned_metric``) at or before the last step of it the trial
    had stored when it paused. Its rungs keep the values it was ranked and promoted on: an
    ask/tell client that trains a promoted trial again from its start reports those steps
    again, and the newest attempt's value would replace them (the rank of others in the
    rung moved up, and one more of them was promoted). Other metrics are stored as usual
    (a trainable may report them on another axis: text-classification's training loss is
    by optimizer step, its validation by epoch). A trial that copied a checkpoint (PBT, a
    replay) has no pause reason left: its points are all kept. A pause reason from before
    ``stored_to`` was recorded bounds them by its rung's step."""
    stored_to = metrics.pause_step(trial.pause_reason)
    if stored_to is None or not points:
        return points
    metric = transitions.spec_of(study).pruned_metric
    return [p for p in points if p.name != metric or p.step > stored_to]


def _store_points(
    s: Session, trial: Trial, points: Sequence[MetricInput], now: datetime, *, ids: bool
) -> list[int]:
    """Store one commit's points of a report (the one place a report writes metric points)
    and move the trial's ``last_step`` past them (:func:`_to_judge` relies on no point lying
    above it). Returns the ids of the rows inserted when ``ids``."""
    if not points:
        return []
    inserted = metrics.add(s, trial, points, now, ids=ids)
    trial.last_step = max(trial.last_step or 0, *(p.step for p in points))
    return inserted


def _running(
    s: Session,
    trial_id: int,
    *,
    token: AttemptToken | None,
    attempt: int | None,
    unnamed_first_only: bool,
    lock: bool = True,
) -> tuple[Study, Trial | None]:
    """The study (its row locked when ``lock``) and its running trial, fenced to its current
    attempt; the trial is None when it should stop (pruned, or its study stopped). Raises
    StaleAttempt, TrialFinished."""
    if lock:
        study, trial = trials.lock(s, trial_id, params=False, key_share=True)
    else:
        study, trial = trials.with_study(s, trial_id)
    fence(trial, token, attempt, unnamed_first_only=unnamed_first_only)
    stopped = (TrialState.PRUNED, TrialState.PAUSED)  # a paused attempt's late points: dropped
    if trial.state in stopped or study.state == StudyState.STOPPED:
        return study, None
    if trial.state != TrialState.RUNNING:
        raise TrialFinished(
            f"trial {trial_id} is {trial.state}; it takes no more metrics or heartbeats",
            field="trial_id",
        )
    return study, trial


def _to_judge(
    s: Session, study: Study, trial: Trial, points: Sequence[MetricInput]
) -> dict[int, int | None]:
    """The steps of the watched metric this report brings for the first time, each with the
    trial's step before it (the pruner judges the rungs in between). Read before the points
    are stored. A step already stored (a replay, a resend) is not judged again, and a step
    reported out of order is judged from the step below it, not from the newest: a trial
    cannot skip rungs by reporting a far-future step first."""
    metric = transitions.spec_of(study).pruned_metric
    steps = sorted({p.step for p in points if p.name == metric})
    if not steps:
        return {}
    # No point of the trial lies above its last_step (each commit of a report moves it).
    if trial.last_step is not None and steps[0] <= trial.last_step:
        stored = metrics.steps_between(s, trial.id, metric, steps[0], steps[-1])
    else:
        stored = set()
    new = [step for step in steps if step not in stored]
    below = metrics.step_below(s, trial.id, metric, steps[0])
    copied_at = pbt.copied_at(trial)  # PBT: it went on from another trial's step, not its own
    if copied_at is not None and copied_at < steps[0] and (below is None or below < copied_at):
        below = copied_at
    known = sorted({*stored, *steps})
    out: dict[int, int | None] = {}
    for step in new:
        i = known.index(step)
        out[step] = known[i - 1] if i > 0 else below
    return out


def _judge(
    s: Session,
    study: Study,
    trial: Trial,
    points: Sequence[MetricInput],
    judged: dict[int, int | None],
) -> Any:
    """The pruner's verdict on the new steps of the watched metric (``judged``: each new
    step with the trial's step before it, from :func:`_to_judge`), as ``study`` was read."""
    spec = transitions.spec_of(study)
    if (spec.pruner.type == "none" and spec.scheduler is None) or not judged:
        return None
    pruner = make_pruner(spec)
    first: dict[int, float] = {}
    for p in points:  # the first value of a step wins, as it is stored
        if p.name == pruner.metric and p.step in judged:
            first.setdefault(p.step, p.value)

    def best_trial() -> int | None:
        best, _ = studies.best(s, studies.get(s, trial.study_id))
        return None if best is None else best.id

    history = metrics.PruningHistory(
        s,
        trial.study_id,
        trial.id,
        pruner.metric,
        study_seq=study.seq,
        steps=list(judged),
        reported=first,
        best_trial=best_trial,
    )
    for step in sorted(first):
        decision = pruner.judge(Report(step, first[step], judged[step], trial.number), history)
        if decision is not None:
            return decision
    return None


def fence(
    trial: Trial,
    token: AttemptToken | None,
    attempt: int | None,
    *,
    unnamed_first_only: bool = False,
) -> None:
    """Raise StaleAttempt unless a write with ``token`` / naming ``attempt`` is of the
    current attempt. A write with neither (an admin write) is not fenced, unless
    ``unnamed_first_only`` (it came over HTTP): then it is refused once the trial was
    handed out again (a later attempt than the first is running or has finished; while
    that attempt waits to be claimed, the trial's state refuses the write itself)."""
    handed_out_again = trial.attempts > 1 and trial.state != TrialState.WAITING
    attempts.require_current(
        trial.id,
        trial.attempts,
        trial.attempt_token_hash,
        token=token,
        attempt=attempt,
        refuse_unnamed=unnamed_first_only and handed_out_again,
    )
