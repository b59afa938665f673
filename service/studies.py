"""Study workflows: create, ask, tell, report, lease expiry. The API and the scheduler call these.

``StudyService`` coordinates: it checks a request against the study's spec and budget, asks the
sampler and the pruner, and applies the life-cycle rules of :mod:`hpo.service.transitions`. Every
query, lock and row it touches belongs to :mod:`hpo.service.storage`. Each workflow is one
transaction (``ask`` is two: it samples outside any lock and then claims the trial number by
compare-and-set, retrying if another asker got there first). The reading methods at the end
only delegate to :class:`~hpo.service.storage.Storage`, which the API reads through directly.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hpo.service import asking, define_by_run, placement, reporting, transitions, warmstart
from hpo.service.attempts import AttemptToken
from hpo.service.db.models import Study, utcnow
from hpo.service.errors import (
    Conflict,
    DatabaseUnavailable,
    InvalidInput,
    NameTaken,
    NotFound,
    StudyNotFound,
    StudyNotRunning,
    SuggestionPending,
    TrialFinished,
)
from hpo.service.executor import FailureClass
from hpo.service.histories import Histories
from hpo.service.records import (
    ClaimedTrial,
    MetricInput,
    StudyRecord,
    TrialRecord,
)
from hpo.service.samplers import sampler_class
from hpo.service.spec import (
    JsonProblem,
    StudySpec,
    check_budget,
    check_json,
    check_json_size,
    check_new,
)
from hpo.service.states import StudyState, TrialState
from hpo.service.storage import MAX_PAGE, Storage, deadlines, leases, studies, trials
from hpo.service.storage.records import trial_record
from hpo.service.storage.session import row_busy
from hpo.service.storage.transitions import set_study_state

__all__ = ["MAX_PAGE", "MetricInput", "StudyService"]  # MetricInput and MAX_PAGE: re-exported

# Studies the service runs itself may be in these states; the scheduler launches for running.
DISPATCHABLE = (StudyState.RUNNING, StudyState.PAUSED)
# How many times a study's delete is tried when it meets a report in a deadlock (PostgreSQL;
# see ``delete_study``).
DELETE_TRIES = 3

# An ask first ends the study's running trials whose lease ran out (their slots, or retries,
# are then handed out), at most this often per study and process: a client asking in a tight
# loop would otherwise pay a sweep per ask. A lease is noticed up to this much late.
LEASE_SWEEP_EVERY_S = 0.1


class StudyService:
    """The control plane's operations on studies and trials, over a :class:`Storage`.

    ``check_trainable`` validates a spec's trainable part (name registered, settings valid for
    every value the space can take) and raises ``ValueError``; the server plugs in the worker
    registry here. ``on_change`` is called after a study is created or updated (the scheduler
    wakes up). ``histories`` keeps each study's sampler history between asks (a bounded
    cache of its own by default). ``ask_wait_s`` bounds how long a client's ask waits for a
    slow sampler's suggestion (GP) before SuggestionPending (HTTP 503; None: no bound, the
    fit runs on the asking thread). Every method may raise DatabaseUnavailable.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        check_trainable: Callable[[StudySpec], None] | None = None,
        on_change: Callable[[], None] | None = None,
        histories: Histories | None = None,
        ask_wait_s: float | None = None,
    ) -> None:
        self.storage = storage
        self.histories = histories if histories is not None else Histories()
        self.suggestions = asking.Suggestions(ask_wait_s)
        self.check_trainable = check_trainable
        self.on_change = on_change
        self._ask_locks: dict[int, threading.Lock] = {}
        self._asking_guard = threading.Lock()
        self._swept_at: dict[int, float] = {}  # study -> monotonic time of its last ask's sweep

    # ----------------------------------------------------------------- studies

    def create_study(self, spec: StudySpec) -> StudyRecord:
        """Store a new running study. Raises InvalidInput (also for ranks that fit no node of
        the cluster as the scheduler last saw it: see :mod:`hpo.service.placement`),
        NameTaken."""
        try:
            check_new(spec)
            sampler_class(spec.sampler.type).check(spec)
            if spec.trainable is not None and self.check_trainable is not None:
                self.check_trainable(spec)
        except ValueError as exc:
            raise InvalidInput(str(exc), field=_field_in(str(exc))) from exc
        placement.check_spec(self.storage, spec)
        with self.storage.write() as s:
            record = studies.record(s, studies.insert(s, spec.name, spec.to_json()))
        self._changed()
        return record

    def create_or_load(self, spec: StudySpec) -> tuple[StudyRecord, bool]:
        """The study named ``spec.name`` if it exists and matches ``spec`` (see
        :func:`hpo.service.warmstart.difference`), else a new one; and whether it was
        created. Raises Conflict naming what differs, and what :meth:`create_study` raises."""
        try:  # a stored study is loaded without the checks a new one takes (check_new)
            return self._load(spec), False
        except StudyNotFound:
            pass
        try:
            return self.create_study(spec), True
        except NameTaken:  # created meanwhile by another caller
            return self._load(spec), False

    def _load(self, spec: StudySpec) -> StudyRecord:
        with self.storage.read() as s:
            study = studies.get(s, studies.resolve(s, spec.name))
            diff = warmstart.difference(transitions.spec_of(study), spec)
            if diff:
                raise Conflict(
                    f"study {spec.name!r} exists with a different {diff}; load it with the "
                    "same, or choose another name",
                    field=diff.split(" ", 1)[0],
                )
            return studies.record(s, study)

    def update_study(
        self,
        study_id: int,
        *,
        state: str | None = None,
        max_trials: int | None = None,
        max_concurrent: int | None = None,
        timeout_s: float | None = None,
        max_steps: int | None = None,
        max_worker_seconds: float | None = None,
        user_attrs: Mapping[str, Any] | None = None,
    ) -> StudyRecord:
        """Pause, resume or stop a study, change its budget (the fields given), or merge
        ``user_attrs`` into its user attributes (a key given None is removed; in any state:
        they are notes, not settings). Raising a
        field of :data:`REOPENING` of a completed study runs it again (``completed →
        running``).

        Raises StudyNotRunning for a stopped study (and a completed one asked for anything
        but a budget), InvalidInput for a budget below the trials handed out, Conflict (and
        changes nothing) for a completed study whose raised budget leaves it completed (the
        error names the field that keeps it so: its time, its compute, its grid; see
        :func:`~hpo.service.warmstart.reopen_if_budget_left`), IllegalTransition for a move
        the state table forbids. A time or compute budget lowered below what the study has
        used ends it as if it ran out.
        """
        given = {
            "max_trials": max_trials,
            "max_concurrent": max_concurrent,
            "timeout_s": timeout_s,
            "max_steps": max_steps,
            "max_worker_seconds": max_worker_seconds,
        }
        changes = {k: v for k, v in given.items() if v is not None}
        with self.storage.write() as s:
            study = studies.get(s, study_id, lock=True)
            if user_attrs:
                study.spec = _new_user_attrs(study, user_attrs)
                studies.touch(study)
            raises_budget = study.state == StudyState.COMPLETED and state in (None, study.state)
            if (
                study.state in (StudyState.STOPPED, StudyState.COMPLETED)
                and (state not in (None, study.state) or changes)
                and not raises_budget
            ):
                raise StudyNotRunning(
                    f"study {study_id} is {study.state}; it can no longer be changed",
                    field="state",
                )
            if changes:
                study.spec = _new_budget(study, changes)
                studies.touch(study)
                held = warmstart.reopen_if_budget_left(s, study)
                if held is not None and changes.keys() & set(REOPENING):
                    raise held  # rolled back: the budget stays as it was
            if state is not None and state != study.state:
                set_study_state(study, state, reason=f"set to {state} through the API")
                if state == StudyState.STOPPED:
                    transitions.stop_active(s, study)
            record = studies.record(s, study)
        self._changed()
        return record

    def delete_study(self, study_id: int) -> list[int]:
        """Delete a study and everything stored with it; returns the ids of trials that were
        still active (the scheduler cancels them). Raises StudyNotFound.

        A running or paused study is stopped first, in a transaction of its own (its active
        trials fail), so that the reports that come later store nothing. On PostgreSQL a
        report takes its trial's curve rows (and, writing a metric's first one, a share of the
        trial's row) before its study's row, and the delete the other way round (the study's
        row, then its points, then the trials' and curves' rows through its cascade): a report
        already under way can still meet the delete in a deadlock, which PostgreSQL breaks by
        ending one of them. When that is the delete, it is tried again (at most
        ``DELETE_TRIES`` times in all), and no new report is under way by then."""
        with self.storage.write() as s:
            study = studies.get(s, study_id, lock=True)
            active = studies.active_trial_ids(s, study_id)
            if study.state in (StudyState.RUNNING, StudyState.PAUSED):
                set_study_state(study, StudyState.STOPPED, reason="stopped to be deleted")
                transitions.stop_active(s, study)
        for tries_left in reversed(range(DELETE_TRIES)):
            try:
                with self.storage.write() as s:
                    studies.delete(s, studies.get(s, study_id, lock=True))
                break
            except DatabaseUnavailable as exc:
                if not tries_left or not row_busy(exc):
                    raise
        self.histories.forget(study_id)
        self.suggestions.forget(study_id)
        with self._asking_guard:
            self._ask_locks.pop(study_id, None)
            self._swept_at.pop(study_id, None)
        return active

    # ------------------------------------------------------------------ trials

    def ask(
        self,
        study_id: int,
        *,
        dispatched: bool = False,
        key: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> ClaimedTrial:
        """Hand out a trial with its attempt's token: a waiting (retried) one first, else a
        new suggestion. An ask with an Idempotency-Key ``key`` used before answers the trial
        that key created (see :func:`hpo.service.asking.ask`).

        Raises StudyNotRunning, BudgetSpent (GridExhausted), ConcurrencyLimit, Conflict,
        TrialFinished (the key's trial has finished), SuggestionPending (a slow sampler's
        suggestion, or this server's other asks of the study, outlasted ``ask_wait_s``: ask
        again), AskContention (other servers' asks kept taking the next trial: ask again),
        InvalidInput (``params`` outside the space). ``dispatched`` marks a call from
        the scheduler; clients may only ask ask/tell studies. ``params`` fixes values of the
        new trial (the sampler fills in the rest).
        """
        turn = self._asking(study_id)
        if not turn.acquire(blocking=False):  # another ask of the study holds it
            if not dispatched:  # refused at once, not after waiting for the scheduler's asks
                spec = self.storage.spec_of(study_id)
                if spec.trainable is not None:
                    asking.refuse_client_ask(study_id, spec)
            wait_s = None if dispatched else self.suggestions.wait_s
            if not turn.acquire(timeout=-1 if wait_s is None else wait_s):
                raise SuggestionPending(
                    f"study {study_id}: its other asks (a slow sampler's fits) held this one "
                    f"for {wait_s:g} s; ask again",
                    retry_after_s=1,
                )
        try:
            now = time.monotonic()
            if now - self._swept_at.get(study_id, -math.inf) >= LEASE_SWEEP_EVERY_S:
                self._swept_at[study_id] = now
                self.expire_leases(study_id=study_id)
            return asking.ask(
                self.storage,
                study_id,
                dispatched=dispatched,
                key=key,
                histories=self.histories,
                suggestions=self.suggestions,
                params=params,
            )
        finally:
            turn.release()

    def _asking(self, study_id: int) -> threading.Lock:
        """This process's asks of one study take turns. Each reads the study's next number,
        samples, and claims that number only if it is still next (asks through other servers
        can take it meanwhile); 64 asks at once from one server each sampled and claimed in
        vain up to 63 times (64 took 3-5 s and some ran out of tries), where in turn
        each samples once."""
        with self._asking_guard:
            return self._ask_locks.setdefault(study_id, threading.Lock())

    def enqueue_trial(self, study_id: int, params: Mapping[str, Any]) -> TrialRecord:
        """Queue a trial with fixed ``params``, handed out before new suggestions (see
        :func:`hpo.service.warmstart.enqueue`)."""
        record = warmstart.enqueue(self.storage, study_id, params)
        self._changed()
        return record

    def import_trials(
        self, study_id: int, finished: Sequence[warmstart.FinishedTrial]
    ) -> list[TrialRecord]:
        """Store finished trials from elsewhere (:func:`hpo.service.warmstart.import_trials`)."""
        return warmstart.import_trials(self.storage, study_id, finished)

    def set_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> TrialRecord:
        """Merge ``attrs`` into the trial's user attributes."""
        return warmstart.set_user_attrs(self.storage, trial_id, attrs)

    def suggest_param(self, trial_id: int, name: str, param: Mapping[str, Any]) -> Any:
        """The value of parameter ``name`` for a running trial, learned into the space on first
        use (see :mod:`hpo.service.define_by_run`)."""
        return define_by_run.suggest(self.storage, trial_id, name, param)

    def tell(
        self,
        trial_id: int,
        *,
        value: float | None = None,
        values: Sequence[float] | None = None,
        state: str | None = None,
        error: str | None = None,
        token: AttemptToken | None = None,
        attempt: int | None = None,
        unnamed_first_only: bool = False,
    ) -> TrialRecord:
        """Finish a trial with its objective value(s), or as failed / pruned.

        Repeating the same tell changes nothing; a different outcome for a finished trial
        raises TrialFinished. A tell made with an attempt's ``token``, or naming an
        ``attempt``, is refused with StaleAttempt unless that attempt is the trial's current
        one; with ``unnamed_first_only`` (an admin tell over HTTP) a tell naming neither is
        refused so once the trial was handed out again. Raises TrialNotFound, InvalidInput,
        Conflict (a waiting trial).
        """
        with self.storage.write() as s:
            study, trial = trials.lock(s, trial_id)
            reporting.fence(trial, token, attempt, unnamed_first_only=unnamed_first_only)
            spec = transitions.spec_of(study)
            outcome = transitions.parse_outcome(spec, value, values, state)
            if TrialState(trial.state).finished:
                if transitions.same_outcome(trial, outcome):
                    return trial_record(trial)
                raise TrialFinished(transitions.finished_message(trial), field="trial_id")
            if trial.state == TrialState.WAITING:
                raise Conflict(
                    f"trial {trial_id} is waiting for attempt {trial.attempts}; "
                    "ask for it before telling its result",
                    field="trial_id",
                )
            new_state, vals = outcome
            if new_state == TrialState.PRUNED and not vals:
                vals = transitions.last_watched_value(s, trial, spec)
            transitions.finish(s, study, trial, new_state, vals, error)
            return trial_record(trial)

    def report(
        self,
        trial_id: int,
        points: Sequence[MetricInput],
        *,
        token: AttemptToken | None = None,
        attempt: int | None = None,
        unnamed_first_only: bool = False,
    ) -> bool:
        """Store metric points of a running trial, renew its lease and consult the pruner
        (:func:`hpo.service.reporting.report`, which says how it is fenced). Returns whether
        the trial should stop."""
        return reporting.report(
            self.storage,
            trial_id,
            points,
            token=token,
            attempt=attempt,
            unnamed_first_only=unnamed_first_only,
        )

    def heartbeat(
        self,
        trial_id: int,
        *,
        token: AttemptToken | None = None,
        attempt: int | None = None,
        unnamed_first_only: bool = False,
    ) -> bool:
        """Renew a running trial's lease; returns whether it should stop. Fenced as
        :meth:`report` is."""
        return self.report(
            trial_id, [], token=token, attempt=attempt, unnamed_first_only=unnamed_first_only
        )

    def fail_attempt(
        self,
        trial_id: int,
        reason: str,
        *,
        failure_class: FailureClass = FailureClass.TRAINABLE,
        attempt: int | None = None,
    ) -> TrialRecord:
        """End the current attempt of a running trial with an error of ``failure_class``.

        The class decides the retry (see :func:`hpo.service.transitions.fail`): an
        ``infrastructure`` loss does not spend ``max_retries``, a ``trainable`` error does, a
        ``deterministic`` one is never retried. When
        ``attempt`` is given and is no longer the trial's current one, nothing changes. A
        finished trial is left as it is. Raises TrialNotFound.
        """
        with self.storage.write() as s:
            study, trial = trials.lock(s, trial_id)
            current = attempt is None or attempt == trial.attempts
            if current and TrialState(trial.state).active:
                transitions.fail(s, study, trial, reason, failure_class=failure_class)
            return trial_record(trial)

    def expire_leases(self, *, study_id: int | None = None) -> int:
        """Fail (or retry) running trials past a deadline; returns how many.

        - lease ran out (no report or heartbeat within ``lease_s``): retried while
          ``max_retries`` allows;
        - no new metric point within ``progress_timeout_s``: retried while ``max_retries``
          allows;
        - attempt longer than ``budget.trial_timeout_s``: failed, not retried;
        - study past ``budget.timeout_s`` (every study, when ``study_id`` is None): its active
          trials fail and the study completes, even when nothing can launch.

        The lease and the progress deadline only end after the client had a full ``lease_s``
        (``progress_timeout_s``) of working control plane to renew them: not while this
        process was frozen or its database unavailable, nor within that time after (see
        :class:`~hpo.service.health.HealthWindow`). The budget deadlines are wall-clock.

        The scheduler cancels the attempts of trials that are no longer running.
        """
        now = utcnow()
        with self.storage.read() as s:
            expired = trials.expired(s, now, study_id=study_id)
        count = sum(self._expire(trial_id) for trial_id in expired)
        if study_id is not None:
            return count
        with self.storage.read() as s:
            timed = deadlines.timed_studies(s)
        if not timed:
            return count
        with self.storage.write() as s:
            # asked inside the transaction: a freeze before it must not count as healthy time
            healthy_s = self.storage.health.healthy_for()
            overdue = deadlines.overdue(s, timed, now, healthy_s=healthy_s)
            ended = deadlines.timed_out_studies(s, timed, now)
        for late in overdue:
            kind = (
                FailureClass.TRAINABLE
                if late.deadline == "progress"
                else FailureClass.DETERMINISTIC
            )
            with contextlib.suppress(NotFound):
                self.fail_attempt(
                    late.trial_id, late.reason, failure_class=kind, attempt=late.attempt
                )
        for timed_out in ended:
            with contextlib.suppress(NotFound):
                self._end_timed_out(timed_out)
        return count + len(overdue)

    def _expire(self, trial_id: int) -> bool:
        """Fail the trial if its lease is still over and the control plane worked for a whole
        ``lease_s`` of its study; True when it did."""
        with self.storage.write() as s:
            try:
                study, trial = trials.lock(s, trial_id)
            except NotFound:  # deleted meanwhile
                return False
            if trial.state != TrialState.RUNNING or trial.lease_expires_at >= utcnow():
                return False
            # asked after the lock: a freeze up to here must not count as healthy time
            if self.storage.health.healthy_for() < transitions.spec_of(study).lease_s:
                return False
            transitions.fail(s, study, trial, "lease expired", failure_class=FailureClass.TRAINABLE)
            return True

    def _end_timed_out(self, study_id: int) -> None:
        """Fail the active trials of a study past ``budget.timeout_s`` and complete it."""
        with self.storage.write() as s:
            study = studies.get(s, study_id, lock=True)
            spec = transitions.spec_of(study)
            if not transitions.timed_out(study, spec):
                return
            reason = (
                f"budget.timeout_s = {spec.budget.timeout_s:g} s reached: the study's time is up"
            )
            for trial in trials.active(s, [study_id]):
                transitions.fail(s, study, trial, reason, failure_class=FailureClass.DETERMINISTIC)
            transitions.complete_if_done(s, study)

    def renew_leases(self, trial_ids: Sequence[int]) -> None:
        """Extend the leases of running trials the executor knows are alive."""
        if trial_ids:
            with self.storage.write() as s:
                trials.renew_leases(s, trial_ids, utcnow())

    def release_paused(self, trial_id: int, attempt: int) -> bool:
        """The paused trial's ``attempt`` has ended and its last checkpoint is recorded: let
        it be promoted (its owner cleared). False when it is no longer that paused attempt."""
        with self.storage.write() as s:
            study, trial = trials.lock(s, trial_id)
            if trial.state != TrialState.PAUSED or trial.attempts != attempt:
                return False
            trial.owner = None
            studies.touch(study, trial)
            return True

    def own_attempt(self, trial_id: int, attempt: int, holder: str, epoch: int) -> bool:
        """Record ``holder`` (a scheduler holding the scheduler lease at ``epoch``) as the
        owner of the trial's running ``attempt``; False (nothing written) when the attempt is
        no longer current or the lease is no longer the holder's."""
        with self.storage.write() as s:
            return leases.own(s, trial_id, attempt, holder, epoch)

    # --------------------------------------------------------- for the scheduler

    def dispatched_studies(self) -> list[tuple[int, str, StudySpec]]:
        """(id, state, spec) of running or paused studies that the service runs itself."""
        return self.storage.studies_in(DISPATCHABLE, dispatched=True)

    def studies_to_evaluate(
        self, skip: set[int]
    ) -> tuple[list[tuple[StudySpec, TrialRecord, str]], set[int]]:
        """Completed dispatched studies whose best trial has a checkpoint but no test metrics
        yet: (spec, best trial, checkpoint path), and the ids of those found with nothing to
        evaluate (no best trial, already evaluated, no checkpoint) — the caller skips both
        until a study runs again, so each tick reads only studies that completed since.
        Studies in ``skip`` are left out."""
        out, settled = [], set()
        for study_id, _, spec in self.storage.studies_in([StudyState.COMPLETED], dispatched=True):
            if study_id in skip:
                continue
            best, _ = self.storage.best(study_id)
            path = None
            if best is not None and best.test_metrics is None:
                path = self.storage.trial_checkpoint(best.id)
            if best is not None and path:
                out.append((spec, best, path))
            else:
                settled.add(study_id)
        return out, settled

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


# The budget fields whose raise can run a completed study again.
REOPENING = ("max_trials", "timeout_s", "max_steps", "max_worker_seconds")


def _new_budget(study: Study, changes: Mapping[str, Any]) -> dict:
    """The study's stored spec with the budget ``changes``. Raises InvalidInput for
    max_trials below the trials already handed out, or a budget the spec does not accept."""
    budget = dict(study.spec.get("budget") or {})
    max_trials = changes.get("max_trials")
    if max_trials is not None and max_trials < study.next_number:
        raise InvalidInput(
            f"budget.max_trials: {max_trials} is below the {study.next_number} "
            "trials already handed out",
            field="budget.max_trials",
        )
    budget.update(changes)
    spec = {**study.spec, "budget": budget}
    checked = StudySpec.model_validate(spec)  # its errors name their fields
    try:
        check_budget(checked.budget, changes)  # what the edit gives, not what it keeps
    except ValueError as exc:
        raise InvalidInput(str(exc), field=_field_in(str(exc))) from exc
    return spec


def _new_user_attrs(study: Study, given: Mapping[str, Any]) -> dict:
    """The study's stored spec with ``given`` merged into its user_attrs (None removes a
    key). Raises InvalidInput naming ``user_attrs`` for what the spec does not accept."""
    attrs = {**(study.spec.get("user_attrs") or {}), **given}
    attrs = {k: v for k, v in attrs.items() if v is not None}
    try:
        check_json(attrs, "user_attrs")
        check_json_size(attrs, "user_attrs")
    except JsonProblem as exc:
        raise InvalidInput(str(exc), field=exc.where) from exc
    return {**study.spec, "user_attrs": attrs}


def _field_in(message: str) -> str:
    """The field a "space.lr: ..." or "space.lr (2.0): ..." style message names."""
    head = message.split(":", 1)[0]
    return head.split(" (", 1)[0] if " " not in head.split(" (", 1)[0] else "space"
