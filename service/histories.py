"""Per-study sampler state kept between asks: each study's finished trials, converted once.

TPE and GP read every finished trial of their study on every ask. Reading them all from the
database and converting each for the engine made an ask O(n) in the study's size with a large
constant (1.6 s at 1,000 trials). Here each study's finished trials are kept in number order,
with the form the sampler made of each (:meth:`~hpo.service.samplers.base.Sampler.prepare`)
and the study's change cursor (``seq``); an ask reads only the trials changed since that
cursor and the active ones (:func:`hpo.service.storage.trials.observed_since`), in the read
transaction it already holds.

It stays equal to a full read because every change of a trial stamps it with the study's
next ``seq`` under the study's row lock (so a cursor never skips a committed change) and a
finished trial never changes state again. A history is dropped when the study's creation
time or the parts of its spec a sampler reads (space, sampler, objectives, pruner) differ
from those it was built for (a spec edit, an id reused by a recreated database), when the
study is deleted through this process, and least recently used first beyond the bounds.
Nothing is persisted: after a restart the first ask of a study rebuilds its history.

Concurrent asks of one study take its history's lock only to apply what changed and copy
the lists; the sampler then runs on that copy. The converted trials are shared, read-only.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections import OrderedDict
from typing import Any

from sqlalchemy.orm import Session

from hpo.service.db.models import Study
from hpo.service.samplers.base import ObservedTrial, Sampler, StudyView
from hpo.service.spec import StudySpec
from hpo.service.states import TrialState
from hpo.service.storage import trials

# What a sampler reads of a spec: a change of any of these invalidates the study's history.
_SAMPLER_KEYS = ("space", "sampler", "objective", "pruner", "constraints")


def learned_from(trial: ObservedTrial) -> bool:
    """Whether samplers learn from ``trial``: complete with values, or pruned. Both are final."""
    state = TrialState(trial.state)
    return state == TrialState.PRUNED or (state == TrialState.COMPLETE and trial.values is not None)


class _History:
    """One study's finished trials in number order, and the cursor they are current to."""

    def __init__(self, fingerprint: tuple[Any, ...]) -> None:
        self.fingerprint = fingerprint
        self.cursor: int | None = None
        self.lock = threading.Lock()
        self.numbers: list[int] = []
        self.trials: list[ObservedTrial] = []
        self.prepared: list[Any] = []
        self.ids: dict[int, int] = {}  # trial id -> number
        self.memo: dict[str, Any] = {}  # the sampler's (StudyView.memo)
        # The prepared forms in the order they were put (StudyView.arrivals): append-only for
        # as long as ``memo`` is this one, so a sampler may extend its own arrays from it.
        self.arrivals: list[Any] = []

    def put(self, trial_id: int, trial: ObservedTrial, prepared: Any) -> None:
        if trial_id in self.ids:
            self.drop(trial_id)
            # A trial replaced, not appended: start a new arrival order, and a new memo with
            # it (asks under way keep the old pair, which stays consistent).
            self.arrivals = list(self.prepared)
            self.memo = {}
        i = bisect.bisect_left(self.numbers, trial.number)
        self.numbers.insert(i, trial.number)
        self.trials.insert(i, trial)
        self.prepared.insert(i, prepared)
        self.arrivals.append(prepared)
        self.ids[trial_id] = trial.number

    def drop(self, trial_id: int) -> None:
        number = self.ids.pop(trial_id)
        i = bisect.bisect_left(self.numbers, number)
        del self.numbers[i], self.trials[i], self.prepared[i]


class Histories:
    """The sampler histories of up to ``max_studies`` studies holding at most ``max_trials``
    trials together (least recently asked dropped first; the study being asked is always
    kept). Safe to share between threads."""

    def __init__(self, max_studies: int = 32, max_trials: int = 100_000) -> None:
        self.max_studies = max_studies
        self.max_trials = max_trials
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, _History] = OrderedDict()

    def view(
        self, session: Session, study: Study, spec: StudySpec, sampler: Sampler, number: int
    ) -> StudyView:
        """What ``sampler`` sees when asked for trial ``number`` of ``study`` (read in
        ``session``, whose transaction this reads the changes in): its finished trials with
        an outcome and its active ones, in number order, with the prepared forms."""
        history = self._entry(study)
        with history.lock:
            since = history.cursor
            pending: list[ObservedTrial] = []
            changes = trials.observed_since(
                session,
                study.id,
                spec.pruned_metric,
                since,
                kept=sampler.keeps_state,
                constraint_metrics=spec.constraint_metrics,
            )
            for change in changes:
                fresh = since is None or change.seq > since
                if fresh and learned_from(change.trial):
                    history.put(change.id, change.trial, sampler.prepare(change.trial))
                elif change.id in history.ids:
                    continue  # seen finished by a newer read than this one: final
                elif TrialState(change.trial.state).active:
                    pending.append(change.trial)
            history.cursor = max(study.seq, since or 0)
            seen = list(history.trials)
            prepared = list(history.prepared)
            arrivals = list(history.arrivals)
            memo = history.memo
            for k, trial in enumerate(pending):  # in number order
                i = bisect.bisect_left(history.numbers, trial.number) + k
                seen.insert(i, trial)
                prepared.insert(i, None)
        self._bound(study.id)
        return StudyView(spec, seen, number, prepared, memo, arrivals)

    def forget(self, study_id: int) -> None:
        """Drop the study's history (it was deleted)."""
        with self._lock:
            self._entries.pop(study_id, None)

    def size(self) -> tuple[int, int]:
        """(studies, trials) held now."""
        with self._lock:
            return len(self._entries), sum(len(h.numbers) for h in self._entries.values())

    def _entry(self, study: Study) -> _History:
        raw = study.spec
        parts = json.dumps({k: raw.get(k) for k in _SAMPLER_KEYS}, sort_keys=True, default=str)
        fingerprint = (study.created_at, parts)
        with self._lock:
            history = self._entries.get(study.id)
            if history is None or history.fingerprint != fingerprint:
                history = self._entries[study.id] = _History(fingerprint)
            self._entries.move_to_end(study.id)
            return history

    def _bound(self, keep: int) -> None:
        with self._lock:
            total = sum(len(h.numbers) for h in self._entries.values())
            for study_id in list(self._entries):
                if len(self._entries) <= self.max_studies and total <= self.max_trials:
                    break
                if study_id != keep:
                    total -= len(self._entries.pop(study_id).numbers)
