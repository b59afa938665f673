"""Study workflows: create, ask, tell, report, lease expiry. The API and the scheduler call these.

Each method is one transaction (``ask`` is two: it samples outside any lock and then claims the
trial number by compare-and-set, retrying if another asker got there first).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from hpo.service import analysis, transitions
from hpo.service import storage as sql
from hpo.service.db.models import MetricPoint, Study, Trial, TrialEvent, utcnow
from hpo.service.errors import (
    BudgetSpent,
    ConcurrencyLimit,
    Conflict,
    GridExhausted,
    InvalidInput,
    NameTaken,
    StudyNotFound,
    StudyNotRunning,
    TrialFinished,
)
from hpo.service.pruners import make_pruner
from hpo.service.pruners.base import Report
from hpo.service.records import (
    ACTIVE_STATES,
    FINISHED_STATES,
    MetricPointRecord,
    StudyRecord,
    TrialRecord,
)
from hpo.service.samplers import sampler_class
from hpo.service.samplers.base import StudyView
from hpo.service.spec import StudySpec

MAX_ASK_ATTEMPTS = 50
MAX_PAGE = 1000


@dataclass(frozen=True)
class MetricInput:
    step: int
    name: str
    value: float


class StudyService:
    """The control plane's operations on studies and trials, over a :class:`Storage`.

    ``check_trainable`` validates a spec's trainable part (name registered, settings valid for
    every value the space can take) and raises ``ValueError``; the server plugs in the worker
    registry here. ``on_change`` is called after a study is created or updated (the scheduler
    wakes up).
    """

    def __init__(
        self,
        storage: sql.Storage,
        *,
        check_trainable: Callable[[StudySpec], None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.storage = storage
        self.check_trainable = check_trainable
        self.on_change = on_change

    # ----------------------------------------------------------------- studies

    def create_study(self, spec: StudySpec) -> StudyRecord:
        """Store a new running study. Raises InvalidInput, NameTaken."""
        try:
            sampler_class(spec.sampler.type).check(spec)
            if spec.trainable is not None and self.check_trainable is not None:
                self.check_trainable(spec)
        except ValueError as exc:
            raise InvalidInput(str(exc), field=_field_in(str(exc))) from exc
        now = utcnow()
        try:
            with self.storage.write() as s:
                if s.scalar(select(Study.id).where(Study.name == spec.name)) is not None:
                    raise NameTaken(f"a study named {spec.name!r} already exists", field="name")
                study = Study(
                    name=spec.name,
                    spec=spec.to_json(),
                    state="running",
                    next_number=0,
                    seq=1,
                    created_at=now,
                    updated_at=now,
                    started_at=now,
                )
                s.add(study)
                s.flush()
                record = self._record(s, study)
        except IntegrityError as exc:  # lost a race for the name
            raise NameTaken(f"a study named {spec.name!r} already exists", field="name") from exc
        self._changed()
        return record

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def get_study(self, study_id: int) -> StudyRecord:
        with self.storage.read() as s:
            return self._record(s, sql.get_study(s, study_id))

    def study_id(self, ref: int | str) -> int:
        """Resolve a study id or name (as the CLI accepts either)."""
        with self.storage.read() as s:
            if isinstance(ref, int) or str(ref).isdigit():
                found = s.scalar(select(Study.id).where(Study.id == int(ref)))
            else:
                found = s.scalar(select(Study.id).where(Study.name == ref))
            if found is None:
                raise StudyNotFound(ref)
            return found

    def study_seq(self, study_id: int) -> int:
        with self.storage.read() as s:
            seq = s.scalar(select(Study.seq).where(Study.id == study_id))
            if seq is None:
                raise StudyNotFound(study_id)
            return seq

    def list_studies(
        self,
        *,
        state: str | None = None,
        limit: int = 50,
        cursor: int | None = None,
        name: str | None = None,
    ) -> tuple[list[StudyRecord], int | None]:
        """Studies newest first; the cursor is the id to continue below."""
        limit = max(1, min(limit, MAX_PAGE))
        with self.storage.read() as s:
            stmt = select(Study).order_by(Study.id.desc()).limit(limit + 1)
            if state:
                stmt = stmt.where(Study.state == state)
            if cursor is not None:
                stmt = stmt.where(Study.id < cursor)
            if name is not None:
                stmt = stmt.where(Study.name == name)
            studies = list(s.scalars(stmt))
            more = len(studies) > limit
            studies = studies[:limit]
            records = [self._record(s, st) for st in studies]
        return records, (studies[-1].id if more else None)

    def update_study(
        self,
        study_id: int,
        *,
        state: str | None = None,
        max_trials: int | None = None,
        max_concurrent: int | None = None,
    ) -> StudyRecord:
        """Pause, resume or stop a study, or change its budget. Raises Conflict."""
        with self.storage.write() as s:
            study = sql.get_study(s, study_id, lock=True)
            if study.state in ("stopped", "completed") and (
                state not in (None, study.state) or max_trials or max_concurrent
            ):
                raise StudyNotRunning(
                    f"study {study_id} is {study.state}; it can no longer be changed",
                    field="state",
                )
            changed = False
            if max_trials is not None or max_concurrent is not None:
                budget = dict(study.spec.get("budget") or {})
                if max_trials is not None:
                    if max_trials < study.next_number:
                        raise InvalidInput(
                            f"budget.max_trials: {max_trials} is below the {study.next_number} "
                            "trials already handed out",
                            field="budget.max_trials",
                        )
                    budget["max_trials"] = max_trials
                if max_concurrent is not None:
                    budget["max_concurrent"] = max_concurrent
                spec = {**study.spec, "budget": budget}
                StudySpec.model_validate(spec)
                study.spec = spec
                changed = True
            if state is not None and state != study.state:
                study.state = state
                study.state_reason = f"set to {state} through the API"
                changed = True
                if state == "stopped":
                    study.finished_at = utcnow()
                    transitions.stop_active(s, study)
            if changed:
                sql.touch(study)
            record = self._record(s, study)
        self._changed()
        return record

    def delete_study(self, study_id: int) -> list[int]:
        """Delete a study and everything stored with it; returns the ids of trials that were
        still active (the scheduler cancels them)."""
        with self.storage.write() as s:
            study = sql.get_study(s, study_id, lock=True)
            active = list(
                s.scalars(
                    select(Trial.id).where(
                        Trial.study_id == study_id, Trial.state.in_(ACTIVE_STATES)
                    )
                )
            )
            s.delete(study)
        return active

    # ------------------------------------------------------------------ trials

    def ask(self, study_id: int, *, dispatched: bool = False) -> TrialRecord:
        """Hand out a trial: a waiting (retried) one first, else a new suggestion.

        Raises StudyNotRunning, BudgetSpent (GridExhausted), ConcurrencyLimit, Conflict.
        ``dispatched`` marks a call from the scheduler; clients may only ask ask/tell studies.
        """
        self.expire_leases(study_id=study_id)
        for _ in range(MAX_ASK_ATTEMPTS):
            with self.storage.read() as s:
                study = sql.get_study(s, study_id)
                spec = transitions.spec_of(study)
                self._check_can_ask(s, study, spec, dispatched)
                waiting = s.scalar(
                    select(Trial.id)
                    .where(Trial.study_id == study_id, Trial.state == "waiting")
                    .order_by(Trial.number)
                    .limit(1)
                )
                if waiting is None:
                    number = study.next_number
                    if number >= transitions.budget_limit(study, spec):
                        self._finish_if_done(study_id)
                        raise transitions.spent_error(study, spec)
                    sampler = transitions.sampler_of(study)
                    observed = (
                        sql.observed_trials(s, study, spec.pruned_metric)
                        if sampler.uses_history
                        else ()
                    )
                    view = StudyView(spec, observed, number)
            if waiting is not None:
                claimed = self._claim_waiting(study_id, waiting, spec, dispatched)
                if claimed is not None:
                    return claimed
                continue
            try:
                suggestion = sampler.suggest(view)
            except GridExhausted:
                self._finish_if_done(study_id)
                raise
            created = self._claim_new(study_id, number, spec, suggestion, dispatched)
            if created is not None:
                return created
        raise Conflict(f"study {study_id}: too many concurrent asks, try again")

    def _check_can_ask(self, s: Session, study: Study, spec: StudySpec, dispatched: bool) -> None:
        if spec.trainable is not None and not dispatched:
            raise Conflict(
                f"study {study.id} runs trainable {spec.trainable.name!r} on the cluster; "
                "ask/tell is for studies without a trainable",
                field="study_id",
            )
        if study.state == "completed" and study.next_number >= transitions.budget_limit(
            study, spec
        ):
            raise transitions.spent_error(study, spec)
        if study.state != "running":
            reason = f" ({study.state_reason})" if study.state_reason else ""
            raise StudyNotRunning(f"study {study.id} is {study.state}{reason}", field="state")
        if transitions.timed_out(study, spec):
            self._finish_if_done(study.id)
            raise BudgetSpent(
                f"study {study.id} ran out of time (budget.timeout_s = {spec.budget.timeout_s})",
                field="budget.timeout_s",
            )
        limit = spec.budget.max_concurrent
        if limit is not None:
            running, _ = sql.count_active(s, study.id)
            if running >= limit:
                raise ConcurrencyLimit(
                    f"study {study.id} already has {running} running trials "
                    f"(budget.max_concurrent = {limit})",
                    field="budget.max_concurrent",
                )

    def _claim_waiting(
        self, study_id: int, trial_id: int, spec: StudySpec, dispatched: bool
    ) -> TrialRecord | None:
        with self.storage.write() as s:
            study = sql.get_study(s, study_id, lock=True)
            self._check_can_ask(s, study, spec, dispatched)
            trial = sql.get_trial(s, trial_id)
            if trial.state != "waiting":
                return None
            now = utcnow()
            trial.state = "running"
            trial.started_at = now
            trial.lease_expires_at = now + timedelta(seconds=spec.lease_s)
            sql.touch(study, trial, now=now)
            sql.add_event(s, trial, "running", f"attempt {trial.attempts}")
            return sql.trial_record(trial)

    def _claim_new(
        self, study_id: int, number: int, spec: StudySpec, suggestion: Any, dispatched: bool
    ) -> TrialRecord | None:
        with self.storage.write() as s:
            study = sql.get_study(s, study_id, lock=True)
            if study.next_number != number:
                return None  # another asker claimed this number: sample again
            self._check_can_ask(s, study, spec, dispatched)
            now = utcnow()
            study.next_number = number + 1
            trial = Trial(
                study_id=study_id,
                number=number,
                state="running",
                attempts=1,
                created_at=now,
                started_at=now,
                lease_expires_at=now + timedelta(seconds=spec.lease_s),
                suggestion=suggestion.info,
            )
            sql.set_params(trial, suggestion.params)
            s.add(trial)
            sql.touch(study, trial, now=now)
            s.flush()
            sql.add_event(s, trial, "running", "suggested by " + suggestion.info["sampler"])
            return sql.trial_record(trial)

    def tell(
        self,
        trial_id: int,
        *,
        value: float | None = None,
        values: Sequence[float] | None = None,
        state: str | None = None,
        error: str | None = None,
    ) -> TrialRecord:
        """Finish a trial with its objective value(s), or as failed / pruned.

        Repeating the same tell changes nothing; a different outcome for a finished trial
        raises TrialFinished.
        """
        with self.storage.write() as s:
            study, trial = sql.lock_trial(s, trial_id)
            spec = transitions.spec_of(study)
            outcome = transitions.parse_outcome(spec, value, values, state)
            if trial.state in FINISHED_STATES:
                if transitions.same_outcome(trial, outcome):
                    return sql.trial_record(trial)
                raise TrialFinished(transitions.finished_message(trial), field="trial_id")
            if trial.state == "waiting":
                raise Conflict(
                    f"trial {trial_id} is waiting for attempt {trial.attempts}; "
                    "ask for it before telling its result",
                    field="trial_id",
                )
            new_state, vals = outcome
            if new_state == "pruned" and not vals:
                vals = transitions.last_watched_value(s, trial, spec)
            transitions.finish(s, study, trial, new_state, vals, error)
            return sql.trial_record(trial)

    def report(self, trial_id: int, points: Sequence[MetricInput]) -> bool:
        """Store metric points of a running trial, renew its lease and consult the pruner.

        Returns whether the trial should stop (pruned, or its study stopped).
        Raises TrialFinished for a trial that completed or failed, InvalidInput for NaN/inf.
        """
        for i, p in enumerate(points):
            if not math.isfinite(p.value):
                raise InvalidInput(
                    f"points[{i}].value must be a finite number, got {p.value}",
                    field=f"points[{i}].value",
                )
        with self.storage.write() as s:
            study, trial = sql.lock_trial(s, trial_id)
            if trial.state == "pruned" or study.state == "stopped":
                return True
            if trial.state != "running":
                raise TrialFinished(
                    f"trial {trial_id} is {trial.state}; it takes no more metrics",
                    field="trial_id",
                )
            spec = transitions.spec_of(study)
            now = utcnow()
            trial.lease_expires_at = now + timedelta(seconds=spec.lease_s)
            if not points:
                return False  # a heartbeat: the lease is renewed, nothing else changed
            watched = spec.pruned_metric
            previous = s.scalar(
                select(func.max(MetricPoint.step)).where(
                    MetricPoint.trial_id == trial.id, MetricPoint.name == watched
                )
            )
            s.add_all(
                MetricPoint(
                    trial_id=trial.id,
                    study_id=study.id,
                    step=p.step,
                    name=p.name,
                    value=float(p.value),
                    time=now,
                )
                for p in points
            )
            s.flush()
            decision = self._judge(s, spec, trial, points, previous)
            steps = [p.step for p in points]
            if steps:
                trial.last_step = max(trial.last_step or 0, *steps)
            if decision is not None:
                trial.pruned = decision.reason
                watched = decision.reason.get("value")
                vals = [watched] if watched is not None and not spec.multi_objective else None
                transitions.finish(s, study, trial, "pruned", vals, None, now=now)
                return True
            sql.touch(study, trial, now=now)
            return False

    def heartbeat(self, trial_id: int) -> bool:
        """Renew a running trial's lease; returns whether it should stop."""
        return self.report(trial_id, [])

    def _judge(
        self,
        s: Session,
        spec: StudySpec,
        trial: Trial,
        points: Sequence[MetricInput],
        previous: int | None,
    ) -> Any:
        """The pruner's verdict on the new points of the watched metric (``previous``: the
        watched metric's last step before them)."""
        if spec.pruner.type == "none":
            return None
        pruner = make_pruner(spec)
        history = sql.SqlPruningHistory(s, trial.study_id, trial.id, pruner.metric)
        for p in sorted(points, key=lambda p: p.step):
            if p.name != pruner.metric:
                continue
            decision = pruner.judge(Report(p.step, p.value, previous), history)
            if decision is not None:
                return decision
            previous = p.step if previous is None else max(previous, p.step)
        return None

    def fail_attempt(self, trial_id: int, reason: str, *, retryable: bool = True) -> TrialRecord:
        """End the current attempt of a running trial with an error.

        If the study allows retries and this attempt was not the last, the trial goes back to
        waiting (same number, attempts + 1); otherwise it fails.
        """
        with self.storage.write() as s:
            study, trial = sql.lock_trial(s, trial_id)
            if trial.state not in ACTIVE_STATES:
                return sql.trial_record(trial)
            transitions.fail(s, study, trial, reason, retryable=retryable)
            return sql.trial_record(trial)

    def expire_leases(self, *, study_id: int | None = None) -> int:
        """Fail (or retry) running trials whose lease ran out; returns how many."""
        now = utcnow()
        with self.storage.read() as s:
            stmt = select(Trial.id).where(Trial.state == "running", Trial.lease_expires_at < now)
            if study_id is not None:
                stmt = stmt.where(Trial.study_id == study_id)
            expired = list(s.scalars(stmt))
        for trial_id in expired:
            with self.storage.write() as s:
                try:
                    study, trial = sql.lock_trial(s, trial_id)
                except Exception:  # deleted meanwhile
                    continue
                if trial.state == "running" and trial.lease_expires_at < utcnow():
                    transitions.fail(s, study, trial, "lease expired", retryable=True)
        return len(expired)

    def renew_leases(self, trial_ids: Sequence[int]) -> None:
        """Extend the leases of running trials the executor knows are alive."""
        if not trial_ids:
            return
        with self.storage.write() as s:
            rows = s.execute(
                select(Trial.id, Study.spec)
                .join(Study, Study.id == Trial.study_id)
                .where(Trial.id.in_(trial_ids), Trial.state == "running")
            ).all()
            now = utcnow()
            for trial_id, spec in rows:
                lease = float(spec.get("lease_s", 300))
                s.execute(
                    update(Trial)
                    .where(Trial.id == trial_id)
                    .values(lease_expires_at=now + timedelta(seconds=lease))
                )

    def set_placement(self, trial_id: int, placement: dict[str, Any]) -> None:
        """Record where a trial runs (node, world size, devices, executor handle)."""
        with self.storage.write() as s:
            study, trial = sql.lock_trial(s, trial_id)
            trial.placement = {**(trial.placement or {}), **placement}
            sql.touch(study, trial)

    def set_checkpoint(self, trial_id: int, path: str) -> None:
        with self.storage.write() as s:
            study, trial = sql.lock_trial(s, trial_id)
            trial.checkpoint = path
            sql.touch(study, trial)

    # --------------------------------------------------------- for the scheduler

    def dispatched_studies(self) -> list[tuple[int, str, StudySpec]]:
        """(id, state, spec) of running or paused studies that the service runs itself."""
        with self.storage.read() as s:
            rows = s.execute(
                select(Study.id, Study.state, Study.spec)
                .where(Study.state.in_(("running", "paused")))
                .order_by(Study.id)
            ).all()
        out = []
        for study_id, state, spec in rows:
            if spec.get("trainable"):
                out.append((study_id, state, transitions.parse_spec(spec)))
        return out

    def active_trials(self, study_ids: Sequence[int]) -> list[TrialRecord]:
        """Running and waiting trials of these studies."""
        if not study_ids:
            return []
        with self.storage.read() as s:
            trials = s.scalars(
                select(Trial)
                .where(Trial.study_id.in_(study_ids), Trial.state.in_(ACTIVE_STATES))
                .options(selectinload(Trial.params))
            )
            return [sql.trial_record(t) for t in trials]

    def trial_states(self, trial_ids: Sequence[int]) -> dict[int, str]:
        """State of each trial that still exists."""
        with self.storage.read() as s:
            rows = s.execute(select(Trial.id, Trial.state).where(Trial.id.in_(trial_ids)))
            return {trial_id: state for trial_id, state in rows}

    def studies_to_evaluate(self, skip: set[int]) -> list[tuple[StudySpec, TrialRecord, str]]:
        """Completed dispatched studies whose best trial has a checkpoint but no test metrics
        yet: (spec, best trial, checkpoint path). Studies in ``skip`` are left out."""
        with self.storage.read() as s:
            rows = s.execute(
                select(Study.id, Study.spec).where(Study.state == "completed").order_by(Study.id)
            ).all()
        out = []
        for study_id, raw in rows:
            if study_id in skip or not raw.get("trainable"):
                continue
            best, _ = self.best(study_id)
            if best is None or best.test_metrics is not None:
                continue
            path = self.trial_checkpoint(best.id)
            if path:
                out.append((transitions.parse_spec(raw), best, path))
        return out

    def set_test_metrics(self, trial_id: int, metrics: dict[str, Any]) -> None:
        with self.storage.write() as s:
            study, trial = sql.lock_trial(s, trial_id)
            trial.test_metrics = metrics
            sql.touch(study, trial)

    def spec_of(self, study_id: int) -> StudySpec:
        with self.storage.read() as s:
            return transitions.spec_of(sql.get_study(s, study_id))

    # ----------------------------------------------------------------- reading

    def get_trial(self, trial_id: int, *, events: bool = True) -> TrialRecord:
        with self.storage.read() as s:
            trial = sql.get_trial(s, trial_id)
            history = None
            if events:
                history = list(
                    s.scalars(
                        select(TrialEvent)
                        .where(TrialEvent.trial_id == trial_id)
                        .order_by(TrialEvent.id)
                    )
                )
            return sql.trial_record(trial, events=history)

    def trial_checkpoint(self, trial_id: int) -> str | None:
        with self.storage.read() as s:
            return sql.get_trial(s, trial_id).checkpoint

    def list_trials(
        self,
        study_id: int,
        *,
        states: Sequence[str] | None = None,
        since: int | None = None,
        limit: int = MAX_PAGE,
    ) -> tuple[list[TrialRecord], int]:
        """Trials changed after cursor ``since`` (all when None), oldest change first.

        Returns them and the cursor to pass next time.
        """
        limit = max(1, min(limit, MAX_PAGE))
        with self.storage.read() as s:
            study = sql.get_study(s, study_id)
            stmt = (
                select(Trial)
                .where(Trial.study_id == study_id)
                .options(selectinload(Trial.params))
                .order_by(Trial.seq, Trial.id)
                .limit(limit)
            )
            if since is not None:
                stmt = stmt.where(Trial.seq > since)
            if states:
                stmt = stmt.where(Trial.state.in_(states))
            trials = list(s.scalars(stmt))
            cursor = trials[-1].seq if len(trials) == limit else max(study.seq, since or 0)
            return [sql.trial_record(t) for t in trials], cursor

    def metrics(
        self,
        trial_id: int,
        *,
        name: str | None = None,
        since_step: int | None = None,
        limit: int = 100_000,
    ) -> list[MetricPointRecord]:
        with self.storage.read() as s:
            sql.get_trial(s, trial_id)
            stmt = (
                select(MetricPoint)
                .where(MetricPoint.trial_id == trial_id)
                .order_by(MetricPoint.step, MetricPoint.id)
                .limit(limit)
            )
            if name is not None:
                stmt = stmt.where(MetricPoint.name == name)
            if since_step is not None:
                stmt = stmt.where(MetricPoint.step > since_step)
            return [
                MetricPointRecord(step=p.step, name=p.name, value=p.value, time=p.time)
                for p in s.scalars(stmt)
            ]

    def metric_points(
        self, trial_ids: Sequence[int], *, name: str | None = None
    ) -> dict[int, list[tuple[str, int, float]]]:
        """Metric points of many trials in one query, ``(name, step, value)`` in step order per
        trial: plots over thousands of trials build no record per point."""
        out: dict[int, list[tuple[str, int, float]]] = {t: [] for t in trial_ids}
        if not out:
            return out
        with self.storage.read() as s:
            stmt = (
                select(MetricPoint.trial_id, MetricPoint.name, MetricPoint.step, MetricPoint.value)
                .where(MetricPoint.trial_id.in_(list(out)))
                .order_by(MetricPoint.trial_id, MetricPoint.step, MetricPoint.id)
            )
            if name is not None:
                stmt = stmt.where(MetricPoint.name == name)
            for trial_id, metric, step, value in s.execute(stmt):
                out[trial_id].append((metric, step, value))
        return out

    def best(self, study_id: int) -> tuple[TrialRecord | None, list[TrialRecord]]:
        """The best complete trial, and the Pareto front (multi-objective studies)."""
        with self.storage.read() as s:
            study = sql.get_study(s, study_id)
            return self._best(s, study)

    # --------------------------------------------------------------- internals

    def _finish_if_done(self, study_id: int) -> None:
        with self.storage.write() as s:
            transitions.complete_if_done(s, sql.get_study(s, study_id, lock=True))

    def _record(self, s: Session, study: Study) -> StudyRecord:
        best, front = self._best(s, study)
        return sql.study_record(study, sql.state_counts(s, study.id), best, front)

    def _best(self, s: Session, study: Study) -> tuple[TrialRecord | None, list[TrialRecord]]:
        spec = transitions.spec_of(study)
        base = (
            select(Trial)
            .where(Trial.study_id == study.id, Trial.state == "complete")
            .options(selectinload(Trial.params))
        )
        if not spec.multi_objective:
            order = (
                Trial.value.asc()
                if spec.objectives[0].direction == "minimize"
                else (Trial.value.desc())
            )
            top = s.scalars(
                base.where(Trial.value.is_not(None)).order_by(order, Trial.number).limit(1)
            ).first()
            record = sql.trial_record(top) if top else None
            return record, [record] if record else []
        trials = [t for t in s.scalars(base) if t.values]
        if not trials:
            return None, []
        signs = np.array([1.0 if o.direction == "minimize" else -1.0 for o in spec.objectives])
        front = analysis.pareto_front(np.array([t.values for t in trials], dtype=float) * signs)
        records = [sql.trial_record(trials[i]) for i in front]
        return None, sorted(records, key=lambda r: r.number)


def _field_in(message: str) -> str:
    """The field a "space.lr: ..." style message names."""
    head = message.split(":", 1)[0]
    return head if " " not in head else "space"
