"""Handing out trials: a waiting (retried) trial first, else a new suggestion of the sampler.

The sampler runs outside any lock; the trial number is then claimed by compare-and-set on the
study's ``next_number`` in a short write transaction, and the whole is retried when another
asker claimed it first. A slow sampler (GP: its fit takes seconds and grows as n³) runs off
the request thread (:class:`Suggestions`): a client's ask waits at most ``HPO_ASK_WAIT_S`` for
it, then answers 503 with Retry-After while the fit goes on, and the retried ask takes the
suggestion. ``StudyService.ask`` calls :func:`ask` after expiring stale leases (at most every
``LEASE_SWEEP_EVERY_S`` per study).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, NoReturn

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hpo.service import define_by_run, pbt, promotions, replay, transitions, warmstart
from hpo.service.background import BackgroundJobs, NotReady
from hpo.service.db.models import Study, Trial, utcnow
from hpo.service.errors import (
    AskContention,
    BudgetSpent,
    ConcurrencyLimit,
    Conflict,
    DatabaseUnavailable,
    GridExhausted,
    InvalidInput,
    StaleAttempt,
    StudyNotRunning,
    SuggestionPending,
    TrialFinished,
)
from hpo.service.histories import Histories
from hpo.service.records import ClaimedTrial
from hpo.service.samplers.base import Sampler, StudyView, Suggestion
from hpo.service.samplers.grid import refuse_off_point
from hpo.service.spec import StudySpec
from hpo.service.states import StudyState, TrialState
from hpo.service.storage import Storage, metrics, studies, trials
from hpo.service.storage.records import trial_record
from hpo.service.storage.transitions import set_trial_state

log = logging.getLogger("hpo.service.asking")

MAX_ASK_ATTEMPTS = 50


class Suggestions:
    """Slow samplers' suggestions, computed on background threads and kept by study and trial
    number until an ask takes them (each is handed out once).

    An ask waits at most ``wait_s`` (None: as long as it takes) for the suggestion of the
    number it fills, then raises SuggestionPending while the fit goes on; the next ask of
    that study and number (the client's retry) takes the result instead of fitting again.
    Fast samplers run on the caller's thread, as do all of them without ``wait_s``.
    """

    def __init__(self, wait_s: float | None = None, workers: int = 2) -> None:
        self.wait_s = wait_s
        self._jobs = BackgroundJobs(workers, keep=256, name="hpo-suggest")

    def suggest(
        self, study_id: int, sampler: Sampler, view: StudyView, *, dispatched: bool = False
    ) -> Suggestion:
        """The sampler's suggestion for ``view.number``; the scheduler's asks
        (``dispatched``) wait for it as long as it takes. Raises SuggestionPending."""
        if not sampler.slow or self.wait_s is None:
            return sampler.suggest(view)
        wait = None if dispatched else self.wait_s
        key = (study_id, view.number)
        try:
            return self._jobs.take(key, sampler.suggest, view, wait_s=wait)
        except NotReady:
            raise SuggestionPending(
                f"study {study_id}: the {sampler.name} sampler is still computing the "
                f"suggestion for trial #{view.number}; ask again (it is kept for the retry)",
                retry_after_s=1,
            ) from None

    def forget(self, study_id: int) -> None:
        """Drop the study's kept suggestions (it was deleted)."""
        self._jobs.forget_where(lambda key: key[0] == study_id)


def ask(
    storage: Storage,
    study_id: int,
    *,
    dispatched: bool,
    key: str | None = None,
    histories: Histories | None = None,
    suggestions: Suggestions | None = None,
    params: Mapping[str, Any] | None = None,
) -> ClaimedTrial:
    """A claimed (running) trial of the study, with the token of its attempt: a waiting one
    first, else a new suggestion. Given ``params`` (checked by :func:`check_fixed`), it is a
    new trial with those values, the sampler filling in the rest.

    ``key`` (an ask's Idempotency-Key) is stored with the trial it creates, or with the
    attempt it claims (a waiting trial, a promoted one: ``ask_claims``); an ask with a key
    already used answers that trial again and spends no budget: while it runs the attempt
    that ask claimed, with a new token for it; while it waits, claimed for its next attempt
    as a plain ask would (the same checks). It raises StaleAttempt once the trial was handed
    out again, TrialFinished once it has finished (or paused).

    Raises StudyNotFound, StudyNotRunning, BudgetSpent (GridExhausted: the study completes
    once no trial is active), ConcurrencyLimit, Conflict (a trainable study asked by a
    client), AskContention (every try lost the next number to other servers' asks: retry),
    StaleAttempt and TrialFinished (a replayed key, above).
    ``dispatched`` marks a call from the scheduler. ``histories`` holds the sampler's view
    of the study between asks; without it the study's history is read whole (the reference
    the cached path is tested against). ``suggestions`` runs slow samplers off the request
    thread with a bounded wait (raising SuggestionPending, HTTP 503, past it); without it
    every sampler runs on the caller's thread.
    """
    for _ in range(MAX_ASK_ATTEMPTS):
        with storage.read() as s:
            study = studies.get(s, study_id)
            spec = transitions.spec_of(study)
            keyed = trials.by_ask_key(s, study_id, key) if key is not None else None
            asked, claimed_attempt = keyed if keyed is not None else (None, 0)
            first = trials.get_trial(s, asked) if asked is not None else None
            if first is not None and params is not None:
                _check_same_params(first, params, key)
            if first is not None and first.state != TrialState.WAITING:
                again = _answer_again(storage, study_id, asked, claimed_attempt)
                if again is None:
                    continue  # it turned waiting meanwhile: look again
                return again
            check_can_ask(storage, s, study, spec, dispatched)
            # A replayed key whose trial waits claims that trial, checked as a plain ask is.
            waiting = asked if asked is not None else trials.first_waiting(s, study_id)
            if params is not None and asked is None:
                waiting = None  # given params make a new trial; the queue waits
                check_fixed(spec, params)
            promotable = (
                promotions.candidates(
                    s, study, spec, settled_only=True, final=_final(s, study, spec)
                )
                if waiting is None and params is None
                else []
            )
            if waiting is None and not promotable:
                number = study.next_number
                if number >= transitions.budget_limit(study, spec):
                    complete_if_done(storage, study_id)
                    raise transitions.spent_error(study, spec)
                sampler = transitions.sampler_of(study)
                if not spec.space:  # define-by-run, nothing learned yet
                    view = None
                elif not sampler.uses_history:
                    view = StudyView(spec, (), number)
                else:
                    view = (histories or Histories()).view(s, study, spec, sampler, number)
                if view is not None and sampler.uses_rungs:
                    view = replace(view, rungs=promotions.rung_values(s, study, spec))
        if waiting is not None:
            claimed = _claim_waiting(storage, study_id, waiting, spec, dispatched, key)
        elif promotable:
            claimed = _promote(storage, study_id, promotable[0].trial_id, spec, dispatched, key)
        else:
            try:
                suggestion = _suggest(sampler, view, suggestions, study_id, dispatched)
            except GridExhausted:
                complete_if_done(storage, study_id)
                raise
            if spec.replay is not None and params is None:  # every trial starts the schedule
                params = spec.replay.params_of(0)
            suggestion = with_fixed(spec, suggestion, params or {})
            claimed = _claim_new(storage, study_id, number, spec, suggestion, dispatched, key)
        if claimed is not None:
            return claimed
    raise AskContention(
        f"study {study_id}: no trial claimed in {MAX_ASK_ATTEMPTS} tries (asks through other "
        "servers kept taking the next one first); ask again"
    )


def _suggest(
    sampler: Sampler,
    view: StudyView | None,
    suggestions: Suggestions | None,
    study_id: int,
    dispatched: bool,
) -> Suggestion:
    """The sampler's suggestion (a slow one through ``suggestions``, when given); an empty
    one for a define-by-run space still empty."""
    if view is None:
        return Suggestion({}, {"sampler": sampler.name})
    if suggestions is None:
        return sampler.suggest(view)
    return suggestions.suggest(study_id, sampler, view, dispatched=dispatched)


def _final(s: Session, study: Study, spec: StudySpec) -> bool:
    """Whether no trial can reach a rung any more (see :func:`promotions.candidates`)."""
    spent = study.next_number >= transitions.budget_limit(study, spec)
    return promotions.no_trial_to_come(s, study, spent)


def check_fixed(spec: StudySpec, params: Mapping[str, Any]) -> None:
    """Refuse (InvalidInput naming ``params.<name>``) values an ask may not fix: a name not in
    the space (a define-by-run study takes any), a value outside its domain, a conditional
    parameter whose parents are not fixed with it (whether it is active would be left to
    the sampler's draw of them; a define-by-run trial's code decides that itself)."""
    warmstart.check_given_params(spec, params)
    if spec.define_by_run:  # the trial's own code decides at run time what is active
        return
    for name in params:
        param = spec.space.get(name)
        for parent, values in ((param.when or {}) if param is not None else {}).items():
            if parent not in params:
                raise InvalidInput(
                    f"params.{parent}: fixing {name} needs its parent {parent} fixed too "
                    f"(one of {values} makes {name} active)",
                    field=f"params.{parent}",
                )


def with_fixed(spec: StudySpec, suggestion: Suggestion, fixed: Mapping[str, Any]) -> Suggestion:
    """The sampler's suggestion with the ``fixed`` values in place of its own, parameters made
    inactive by them left out. A define-by-run study's trial carries only the fixed values:
    the suggestion becomes its proposal (see :mod:`hpo.service.define_by_run`)."""
    if fixed and suggestion.info.get("sampler") == "grid":
        refuse_off_point(suggestion.params, suggestion.info["grid_index"], fixed)
    if spec.define_by_run:
        return define_by_run.proposal(spec, suggestion, fixed)
    if not fixed:
        return suggestion
    merged = {**suggestion.params, **fixed}
    params = {}
    for name in spec.parameter_order():
        if not spec.is_active(name, merged):
            if name in fixed:
                raise InvalidInput(
                    f"params.{name}: inactive under the given parent values",
                    field=f"params.{name}",
                )
            continue
        if name not in merged:
            raise InvalidInput(
                f"params.{name}: missing: it is active under the given values; give it too",
                field=f"params.{name}",
            )
        params[name] = merged[name]
    return Suggestion(params, {**suggestion.info, "fixed": sorted(fixed)})


def refuse_client_ask(study_id: int, spec: StudySpec) -> NoReturn:
    """Raise Conflict: a study with a trainable is asked by the scheduler only."""
    assert spec.trainable is not None
    raise Conflict(
        f"study {study_id} runs trainable {spec.trainable.name!r} on the cluster; "
        "ask/tell is for studies without a trainable",
        field="study_id",
    )


def check_can_ask(
    storage: Storage, s: Session, study: Study, spec: StudySpec, dispatched: bool
) -> None:
    """Raise why the study hands out no trial now (see :func:`ask`), if it does not."""
    if spec.trainable is not None and not dispatched:
        refuse_client_ask(study.id, spec)
    if study.state == StudyState.COMPLETED and study.next_number >= transitions.budget_limit(
        study, spec
    ):
        raise transitions.spent_error(study, spec)
    if study.state != StudyState.RUNNING:
        reason = f" ({study.state_reason})" if study.state_reason else ""
        raise StudyNotRunning(f"study {study.id} is {study.state}{reason}", field="state")
    if transitions.timed_out(study, spec):
        complete_if_done(storage, study.id)
        raise BudgetSpent(
            f"study {study.id} ran out of time (budget.timeout_s = {spec.budget.timeout_s})",
            field="budget.timeout_s",
        )
    if spent := transitions.compute_spent(s, study, spec):  # completes as its last trial ends
        raise transitions.compute_spent_error(study, spec, spent)
    limit = spec.budget.max_concurrent
    if limit is not None:
        running, _ = studies.count_active(s, study.id)
        if running >= limit:
            raise ConcurrencyLimit(
                f"study {study.id} already has {running} running trials "
                f"(budget.max_concurrent = {limit})",
                field="budget.max_concurrent",
            )


def complete_if_done(storage: Storage, study_id: int) -> None:
    """In a transaction of its own: complete the study if its budget is spent and no trial
    is active."""
    with storage.write() as s:
        transitions.complete_if_done(s, studies.get(s, study_id, lock=True))


def _claim_waiting(
    storage: Storage,
    study_id: int,
    trial_id: int,
    spec: StudySpec,
    dispatched: bool,
    key: str | None,
) -> ClaimedTrial | None:
    """Claim the waiting trial for its next attempt (asked with Idempotency-Key ``key``);
    None if another asker got it, or that key, first."""
    try:
        with storage.write() as s:
            study = studies.get(s, study_id, lock=True)
            check_can_ask(storage, s, study, spec, dispatched)
            trial = trials.get_trial(s, trial_id)
            if trial.state != TrialState.WAITING or not _key_free(s, study_id, key, trial_id):
                return None
            now = utcnow()
            set_trial_state(
                s, study, trial, TrialState.RUNNING, detail=f"attempt {trial.attempts}", now=now
            )
            trial.started_at = now
            trials.renew_lease(trial, spec.lease_s, now)
            if key is not None:
                trials.note_claim(s, trial, key)
            return _claimed(trial)
    except IntegrityError:
        return None  # a concurrent ask with the same key won: look again


def _promote(
    storage: Storage,
    study_id: int,
    trial_id: int,
    spec: StudySpec,
    dispatched: bool,
    key: str | None = None,
) -> ClaimedTrial | None:
    """Promote the paused trial and claim it for its next attempt, which resumes from its
    checkpoint; None if it is no longer promotable (another asker promoted it, or the rung
    changed) or could not resume (then it failed, with the reason). Its checkpoint is looked
    at before the lock; the promotion is decided again under it."""
    with storage.read() as s:
        paused = trials.get_trial(s, trial_id, params=False)
        checkpoint = paused.checkpoint
        paused_at = metrics.step_paused_at(paused.last_step, paused.pause_reason)
        copy = pbt.donor_checkpoint(s, spec, paused.pause_reason)
    problem, resume_from = None, checkpoint
    if spec.trainable is not None:
        resume_from = promotions.resume_point(checkpoint, paused_at)
        problem = promotions.checkpoint_problem(resume_from)
    attempt = paused.attempts + 1
    taken = pbt.take(copy, checkpoint, attempt)  # pbt: copied into its own folder
    if taken.path is not None:  # pbt: the donor's checkpoint, when it reads back
        problem, resume_from = None, taken.path
    claimed = None
    try:
        claimed = _promote_now(
            storage,
            study_id,
            trial_id,
            spec,
            dispatched,
            checkpoint,
            problem,
            taken,
            resume_from,
            key,
        )
    except IntegrityError:
        pass  # a concurrent ask with the same key won: look again
    finally:
        if claimed is None:  # another asker promoted it, it is no longer promotable, or an error
            _discard(storage, trial_id, copy, taken, attempt)
    return claimed


def _discard(
    storage: Storage, trial_id: int, copy: pbt.Copy, taken: pbt.Copy, attempt: int
) -> None:
    """Take back a copy made for a promotion that did not happen (see :func:`pbt.discard`),
    judged on the trial as it is now; left alone when that cannot be read (a database
    outage: an ambiguous commit may have promoted it with this copy)."""
    if taken.path is None or taken.path == copy.path:
        return
    try:
        with storage.read() as s:
            trial = s.get(Trial, trial_id)
            pbt.discard(taken, trial, attempt)
    except DatabaseUnavailable:
        log.warning("left the checkpoint copied for trial %s at %s", trial_id, taken.path)


def _promote_now(
    storage: Storage,
    study_id: int,
    trial_id: int,
    spec: StudySpec,
    dispatched: bool,
    checkpoint: str | None,
    problem: str | None,
    copy: pbt.Copy,
    resume_from: str | None,
    key: str | None,
) -> ClaimedTrial | None:
    """:func:`_promote`'s decision under the study's lock, with the checkpoint looked at
    (the promoted attempt noted as claimed by Idempotency-Key ``key``)."""
    with storage.write() as s:
        study = studies.get(s, study_id, lock=True)
        check_can_ask(storage, s, study, spec, dispatched)
        trial = trials.get_trial(s, trial_id)
        if trial.state != TrialState.PAUSED or trial.checkpoint != checkpoint or trial.owner:
            return None
        if not _key_free(s, study_id, key, trial_id):
            return None
        if problem is not None and spec.trainable is not None:
            transitions.fail_paused(s, study, trial, f"cannot resume: {problem}")
            return None
        final = _final(s, study, spec)
        ranked = promotions.candidates(s, study, spec, settled_only=True, final=final)
        chosen = next((p for p in ranked if p.trial_id == trial_id), None)
        if chosen is None:
            return None
        reason = chosen.reason
        if spec.pbt is not None:
            reason = pbt.exploit(s, spec, trial, copy, resume_from)
        elif spec.replay is not None:
            reason = replay.retune(spec, trial, resume_from)
        transitions.promote(s, study, trial, reason)
        now = utcnow()
        set_trial_state(
            s, study, trial, TrialState.RUNNING, detail=f"attempt {trial.attempts}", now=now
        )
        trial.started_at = now  # the attempt's start (trial_timeout_s is per attempt)
        trials.renew_lease(trial, spec.lease_s, now)
        if key is not None:
            trials.note_claim(s, trial, key)
        return _claimed(trial, resume_from=resume_from)


def _claim_new(
    storage: Storage,
    study_id: int,
    number: int,
    spec: StudySpec,
    suggestion: Suggestion,
    dispatched: bool,
    key: str | None,
) -> ClaimedTrial | None:
    """Create trial ``number`` (asked with Idempotency-Key ``key``); None if another asker
    took that number, or that key, first."""
    try:
        with storage.write() as s:
            study = studies.get(s, study_id, lock=True)
            if study.next_number != number:
                return None  # another asker claimed this number: sample again
            if not _key_free(s, study_id, key, None):
                return None
            check_can_ask(storage, s, study, spec, dispatched)
            trial = trials.insert(
                s,
                study,
                number,
                suggestion.params,
                suggestion.info,
                lease_s=spec.lease_s,
                now=utcnow(),
                ask_key=key,
            )
            return _claimed(trial)
    except IntegrityError:
        return None  # a concurrent ask with the same key (or number) won: look again


def _key_free(s: Session, study_id: int, key: str | None, trial_id: int | None) -> bool:
    """Under the study's lock: whether an ask with Idempotency-Key ``key`` may claim trial
    ``trial_id`` (None: create one). Not when an ask with that key created or claimed
    another trial meanwhile (a copy of it sent to another server, read before that one
    committed): the caller returns None and the ask looks again, answering that trial."""
    if key is None:
        return True
    held = trials.by_ask_key(s, study_id, key)
    return held is None or held[0] == trial_id


def _check_same_params(trial: Trial, params: Mapping[str, Any], key: str | None) -> None:
    """Refuse (Conflict) a replayed ask whose fixed ``params`` differ from the values of the
    trial its key created: it is another request under a used key, not a replay."""
    stored = {p.name: p.value for p in trial.params}
    differ = sorted(n for n, v in params.items() if n not in stored or stored[n] != v)
    if differ:
        raise Conflict(
            f"Idempotency-Key {key!r} created trial {trial.id} (#{trial.number}) with other "
            f"values of {', '.join(differ)} than this ask's params; send a new key for another "
            "trial",
            field="Idempotency-Key",
        )


def _answer_again(
    storage: Storage, study_id: int, trial_id: int, attempt: int
) -> ClaimedTrial | None:
    """The running trial an earlier ask with an Idempotency-Key created or claimed, answered
    again (with a new token) while it runs ``attempt``, the one that ask claimed; None when
    it is waiting (the caller claims it as a plain ask would).

    Raises StaleAttempt when the trial was handed out again since (its current attempt
    belongs to another asker), TrialFinished when it has finished.
    """
    with storage.write() as s:
        studies.get(s, study_id, lock=True)
        trial = trials.get_trial(s, trial_id)
        if trial.state == TrialState.WAITING:
            return None
        where = f"trial {trial_id} (#{trial.number}), asked for by an earlier ask with this "
        if trial.state != TrialState.RUNNING:
            raise TrialFinished(
                f"{where}Idempotency-Key, is {trial.state}; send a new key to ask for another "
                "trial",
                field="Idempotency-Key",
            )
        if trial.attempts > attempt:
            raise StaleAttempt(
                f"{where}Idempotency-Key, was handed out again (attempt {trial.attempts} is "
                "current, not the attempt that ask claimed); send a new key to ask for "
                "another trial",
                field="Idempotency-Key",
            )
        return _claimed(trial)


def _claimed(trial: Trial, *, resume_from: str | None = None) -> ClaimedTrial:
    """The claimed trial as its asker gets it: with a new token for its current attempt (and
    the checkpoint a promoted trial resumes from)."""
    token = trials.issue_token(trial)
    return ClaimedTrial(**dict(trial_record(trial)), attempt_token=token, resume_from=resume_from)
