"""The storage contract: every read the API and the scheduler make, and the small writes of
fields that carry no state (placement, checkpoint, test metrics).

Each method is one transaction and returns records (never rows). Every method may raise
:class:`~hpo.service.errors.DatabaseUnavailable` when the database is unreachable or locked;
the other errors each one raises are listed in its docstring. Methods are safe to call from
many threads at once: they share nothing but the engine's connection pool.

Workflows that read and then write (ask, tell, report, leases) are not here: ``StudyService``
composes them from the per-table functions in this package inside one :meth:`write`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hpo.service.attempts import AttemptToken
from hpo.service.records import (
    Lineage,
    MetricPointRecord,
    StudyRecord,
    TrialMetricPoint,
    TrialRecord,
)
from hpo.service.spec import StudySpec
from hpo.service.states import StudyState, TrialState
from hpo.service.storage import curves, metrics, studies, trials
from hpo.service.storage import events as event_rows
from hpo.service.storage.records import parse_spec, spec_of, trial_record
from hpo.service.storage.session import Transactions

MAX_PAGE = studies.MAX_PAGE


class Storage(Transactions):
    """Studies, trials and metric points in one SQL database (SQLite or PostgreSQL)."""

    # ------------------------------------------------------------------ studies

    def get_study(self, study_id: int) -> StudyRecord:
        """The study with its counts and best trial(s). Raises StudyNotFound."""
        with self.read() as s:
            return studies.record(s, studies.get(s, study_id))

    def study_id(self, ref: int | str) -> int:
        """The id of the study named by an id or a name. Raises StudyNotFound."""
        with self.read() as s:
            return studies.resolve(s, ref)

    def study_seq(self, study_id: int) -> int:
        """The study's change sequence: it grows with every change of the study or one of its
        trials but their metric points (remembered: see :meth:`known_study_seq`). Raises
        StudyNotFound."""
        read = self.seqs.reading(study_id)
        with self.read() as s:
            seq = studies.seq(s, study_id)
        read(seq)
        return seq

    def known_study_seq(self, study_id: int) -> int | None:
        """The study's ``seq`` as :meth:`study_seq` read it less than ``KNOWN_SEQ_S`` ago, unless
        a write of this process changed the study since; else None. Reads nothing (safe on
        the event loop)."""
        return self.seqs.get(study_id)

    def study_curve_seq(self, study_id: int) -> int:
        """The study's curves cursor: it grows with every change, metric points included (never
        below :meth:`study_seq`). Raises StudyNotFound."""
        with self.read() as s:
            return studies.curve_seq(s, study_id)

    def spec_of(self, study_id: int) -> StudySpec:
        """The study's spec. Raises StudyNotFound."""
        with self.read() as s:
            return spec_of(studies.get(s, study_id))

    def list_studies(
        self,
        *,
        state: str | None = None,
        limit: int = 50,
        cursor: int | None = None,
        name: str | None = None,
    ) -> tuple[list[StudyRecord], int | None]:
        """Studies newest first (in ``state``, named ``name``), at most ``limit`` (capped at
        MAX_PAGE); and the cursor (an id) to continue below, or None after the last page."""
        with self.read() as s:
            rows, next_cursor = studies.page(s, state=state, limit=limit, cursor=cursor, name=name)
            return [studies.record(s, st) for st in rows], next_cursor

    def best(self, study_id: int) -> tuple[TrialRecord | None, list[TrialRecord]]:
        """The best complete trial, and the Pareto front (multi-objective studies: the best
        trial is then None). Raises StudyNotFound."""
        with self.read() as s:
            return studies.best(s, studies.get(s, study_id))

    def studies_in(
        self, states: Sequence[StudyState], *, dispatched: bool = False
    ) -> list[tuple[int, StudyState, StudySpec]]:
        """(id, state, spec) of every study in one of ``states``, oldest first; only those
        with a trainable (that the service runs itself) when ``dispatched``."""
        with self.read() as s:
            rows = studies.in_states(s, states)
        return [
            (sid, StudyState(state), parse_spec(raw))
            for sid, state, raw in rows
            if raw.get("trainable") or not dispatched
        ]

    # ------------------------------------------------------------------- trials

    def get_trial(self, trial_id: int, *, events: bool = True) -> TrialRecord:
        """The trial, with its history when ``events``. Raises TrialNotFound."""
        with self.read() as s:
            trial = trials.get_trial(s, trial_id)
            history = event_rows.of_trial(s, trial_id) if events else None
            return trial_record(trial, events=history)

    def lineage(self, trial_id: int) -> Lineage:
        """The schedule a fresh trial follows to train as this one did (see
        :func:`hpo.service.replay.lineage`). Raises TrialNotFound."""
        from hpo.service import replay

        with self.read() as s:
            return replay.lineage(s, trials.get_trial(s, trial_id))

    def trial_checkpoint(self, trial_id: int) -> str | None:
        """The path of the trial's newest checkpoint, if any. Raises TrialNotFound."""
        with self.read() as s:
            return trials.get_trial(s, trial_id).checkpoint

    def list_trials(
        self,
        study_id: int,
        *,
        states: Sequence[str] | None = None,
        since: int | None = None,
        limit: int = MAX_PAGE,
    ) -> tuple[list[TrialRecord], int]:
        """Trials changed after cursor ``since`` (all when None), oldest change first, at most
        ``limit``; and the cursor to pass next time. New metric points count as a change (a
        record carries ``last_step``): the cursor is the curves' one, ``curve_seq``. Raises
        StudyNotFound."""
        with self.read() as s:
            study = studies.get(s, study_id)
            rows = trials.page(s, study_id, states=states, since=since, limit=limit, curves=True)
            full = len(rows) == max(1, min(limit, MAX_PAGE))
            cursor = rows[-1].curve_seq if full else max(study.curve_seq, since or 0)
            records = [trial_record(t) for t in rows]
            spec = spec_of(study)
            if spec.constraints:  # what the best trial is chosen among, said of each
                complete = [t for t in rows if t.state == TrialState.COMPLETE.value]
                feasible = {t.id for t in studies.feasible(s, spec, complete)}
                records = [
                    r.model_copy(update={"feasible": r.id in feasible})
                    if r.state == TrialState.COMPLETE
                    else r
                    for r in records
                ]
            return records, cursor

    def outcomes(
        self, study_id: int, *, since: int | None = None, limit: int = MAX_PAGE
    ) -> tuple[list[trials.Outcome], int]:
        """What the dashboard's analyses read of the trials changed after cursor ``since``
        (all when None; by ``seq``: metric points do not count), oldest change first, at most
        ``limit``; and the cursor to pass next time. Raises StudyNotFound."""
        with self.read() as s:
            study = studies.get(s, study_id)
            rows = trials.outcomes(s, study_id, since, limit)
            full = len(rows) == max(1, min(limit, MAX_PAGE))
            return rows, rows[-1].seq if full else max(study.seq, since or 0)

    def observed_since(
        self, study_id: int, pruned_metric: str, since: int | None = None
    ) -> tuple[list[trials.TrialChange], int]:
        """The study's trials as samplers see them that changed after cursor ``since`` (every
        trial when None), plus its active ones, in number order; and the cursor to pass next
        time. A trial seen finished never changes again (finished states are final), so a
        cache that applies each answer stays equal to a full read. Raises StudyNotFound."""
        with self.read() as s:
            cursor = studies.seq(s, study_id)
            return trials.observed_since(s, study_id, pruned_metric, since), cursor

    def active_trials(self, study_ids: Sequence[int]) -> list[TrialRecord]:
        """Running and waiting trials of these studies."""
        if not study_ids:
            return []
        with self.read() as s:
            return [trial_record(t) for t in trials.active(s, study_ids)]

    def paused_owned(self, study_ids: Sequence[int]) -> list[TrialRecord]:
        """Paused trials of these studies whose pausing attempt a scheduler still owns."""
        if not study_ids:
            return []
        with self.read() as s:
            return [
                trial_record(t) for t in trials.paused_trials(s, study_ids) if t.owner is not None
            ]

    def trial_states(self, trial_ids: Sequence[int]) -> dict[int, TrialState]:
        """The state of each of ``trial_ids`` that still exists (deleted ones are absent)."""
        with self.read() as s:
            return trials.states(s, trial_ids)

    def attempt_matches(self, token: AttemptToken) -> bool:
        """Whether ``token`` is the credential of its trial's current attempt (False: a wrong
        token, or no such trial). Raises StaleAttempt when it names an earlier attempt."""
        with self.read() as s:
            row = trials.credential(s, token.trial_id)
        return row is not None and token.check(token.trial_id, *row)

    # ------------------------------------------------------------------ metrics

    def metrics(
        self,
        trial_id: int,
        *,
        name: str | None = None,
        since_step: int | None = None,
        limit: int = 100_000,
    ) -> list[MetricPointRecord]:
        """The trial's metric points in step order. Raises TrialNotFound."""
        with self.read() as s:
            trials.get_trial(s, trial_id)
            return metrics.of_trial(s, trial_id, name=name, since_step=since_step, limit=limit)

    def study_metrics(
        self,
        study_id: int,
        *,
        name: str | None = None,
        after: int | None = None,
        limit: int = 100,
    ) -> tuple[list[TrialMetricPoint], int | None]:
        """A page of the study's metric points, trial by trial (:func:`metrics.of_study`),
        and the cursor of the next page (None at the end). Raises StudyNotFound."""
        with self.read() as s:
            studies.get(s, study_id)
            return metrics.of_study(s, study_id, name=name, after=after, limit=limit)

    def curves_page(
        self,
        study_id: int,
        name: str,
        *,
        since: int | None = None,
        limit: int = MAX_PAGE,
        best: int | None = None,
        objective: int = 0,
    ) -> tuple[list[curves.CurveRow], dict[int, curves.Kept], set[str], int]:
        """The trials whose curves changed after curves cursor ``since`` (as
        :meth:`list_trials` pages them, in columns only), the points kept at rest of metric
        ``name`` for them (those that have one; see :mod:`.curves`), every metric
        name they have curves of, and the cursor to pass next time. Raises StudyNotFound.

        With ``best`` (and no ``since``): instead of every trial, the ``best`` best complete
        ones with a curve of ``name`` by objective ``objective`` and at most as many
        unfinished ones (:func:`curves.best`), and the cursor of the study as read before
        them (a trial that changes meanwhile comes again after it)."""
        limit = max(1, min(limit, MAX_PAGE))
        with self.read() as s:
            study = studies.get(s, study_id)
            if best is not None:
                spec = spec_of(study)
                minimize = spec.objectives[objective].direction == "minimize"
                rows = curves.best(
                    s,
                    study_id,
                    best,
                    name,
                    objective,
                    minimize=minimize,
                    multi=spec.multi_objective,
                )
                cursor = study.curve_seq
            else:
                rows = curves.changed(s, study_id, since, limit)
                full = len(rows) == limit
                cursor = rows[-1].curve_seq if full else max(study.curve_seq, since or 0)
            ids = [r.id for r in rows]
            kept = curves.kept_of_trials(s, ids, name)
            return rows, kept, curves.names_of(s, ids), cursor

    def curves(
        self, trial_ids: Sequence[int], name: str
    ) -> tuple[dict[int, curves.Curve], set[str]]:
        """The downsampled curves of metric ``name`` kept at rest for these trials (those that
        have one; see :mod:`.curves`), and every metric name the trials have curves of."""
        if not trial_ids:
            return {}, set()
        with self.read() as s:
            return curves.of_trials(s, trial_ids, name), curves.names_of(s, trial_ids)

    # ----------------------------------------------- fields that carry no state

    def merge_placement(self, trial_id: int, placement: dict[str, Any]) -> None:
        """Merge ``placement`` (node, world size, devices, executor handle) into the trial's.
        Raises TrialNotFound."""
        with self.write() as s:
            study, trial = trials.lock(s, trial_id)
            trial.placement = {**(trial.placement or {}), **placement}
            studies.touch(study, trial)

    def set_checkpoint(self, trial_id: int, path: str) -> None:
        """Record the trial's newest checkpoint. Raises TrialNotFound."""
        with self.write() as s:
            study, trial = trials.lock(s, trial_id)
            trial.checkpoint = path
            studies.touch(study, trial)

    def set_test_metrics(self, trial_id: int, test_metrics: dict[str, Any]) -> None:
        """Record the trial's held-out test metrics. Raises TrialNotFound."""
        with self.write() as s:
            study, trial = trials.lock(s, trial_id)
            trial.test_metrics = test_metrics
            studies.touch(study, trial)
