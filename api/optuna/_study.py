"""Optuna's ``Study`` over an hpo server: the study lives on the server, this object runs the
objective in this process (``optimize``) and reads results back.

``create_study(storage=URL)`` names the server (default ``$HPO_URL``, else
``http://127.0.0.1:8000``; the token is ``$HPO_TOKEN`` or the file a local ``hpo serve``
wrote). The study is define-by-run: parameters are learned as trials first suggest them.
"""

from __future__ import annotations

import enum
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from hpo.api import client as hpo_client
from hpo.api.objective import run_trial
from hpo.service import errors
from hpo.service.records import TrialRecord

from ._trial import _STATES as _STATE_OF
from ._trial import FrozenTrial, Trial, TrialState
from ._unmapped import unmapped_method as _unmapped_method
from .exceptions import DuplicatedStudyError
from .pruners import BasePruner, MedianPruner
from .samplers import BaseSampler, TPESampler

# A cap on ``n_trials`` for every optimize (a test or a dry run of an unchanged script).
MAX_TRIALS_ENV = "HPO_OPTUNA_MAX_TRIALS"
ObjectiveFunc = Callable[[Trial], Any]
# Optuna's default columns of trials_dataframe (system_attrs: empty here)
DATAFRAME_ATTRS = (
    "number",
    "value",
    "datetime_start",
    "datetime_complete",
    "duration",
    "params",
    "user_attrs",
    "system_attrs",
    "state",
)
Callback = Callable[["Study", FrozenTrial], None]


class Study:
    """A study on the hpo server, with Optuna's methods."""

    def __init__(self, study: hpo_client.Study) -> None:
        self._study = study
        self.study_name = study.name
        self._asked: dict[int, hpo_client.AskedTrial] = {}  # by number: what tell(int) names
        self._runs: list[_Run] = []  # the optimize calls under way (what stop() ends)
        self._metrics = [o["metric"] for o in study.objectives]
        self.directions = [StudyDirection[o["direction"].upper()] for o in study.objectives]

    @property
    def direction(self) -> StudyDirection:
        if len(self.directions) > 1:
            raise RuntimeError("a multi-objective study has `directions`, not `direction`")
        return self.directions[0]

    # ---------------------------------------------------------------- running

    def optimize(
        self,
        func: ObjectiveFunc,
        n_trials: int | None = None,
        timeout: float | None = None,
        n_jobs: int = 1,
        catch: Iterable[type[Exception]] | type[Exception] = (),
        callbacks: Sequence[Callback] | None = None,
        gc_after_trial: bool = False,
        show_progress_bar: bool = False,
    ) -> None:
        """Run ``func`` on ``n_trials`` trials (all jobs together) or until ``timeout``
        seconds have passed, ``n_jobs`` at a time in threads of this process; each finished
        trial is passed to every callback as ``callback(study, frozen_trial)``."""
        cap = os.environ.get(MAX_TRIALS_ENV)
        if cap:
            n_trials = int(cap) if n_trials is None else min(n_trials, int(cap))
        catch = tuple(catch) if isinstance(catch, Iterable) else (catch,)
        run = _Run(self, func, n_trials, timeout, catch, list(callbacks or []))
        jobs = (os.cpu_count() or 1) if n_jobs == -1 else max(1, n_jobs)
        self._runs.append(run)
        try:
            if jobs == 1:
                run.loop()
                return
            threads = [threading.Thread(target=run.loop_catching, daemon=True) for _ in range(jobs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if run.error is not None:
                raise run.error
        finally:
            self._runs.remove(run)

    def stop(self) -> None:
        """End the ``optimize`` under way once its running trials finish (from an objective
        or a callback, as Optuna's). Raises RuntimeError outside ``optimize``."""
        if not self._runs:
            raise RuntimeError(
                "`Study.stop` is supposed to be invoked inside an objective function or a callback."
            )
        for run in self._runs:
            run.stopped = True

    def ask(self, fixed_distributions: Mapping[str, Any] | None = None) -> Trial:
        asked = self._study.ask()
        self._asked[asked.number] = asked
        trial = Trial(self, asked)
        for name, dist in (fixed_distributions or {}).items():
            trial._suggest(name, dist)
        return trial

    def tell(
        self,
        trial: Trial | int,
        values: float | Sequence[float] | None = None,
        state: TrialState | None = None,
        skip_if_finished: bool = False,
    ) -> FrozenTrial:
        """Finish ``trial`` (a Trial, or its number in this study, as in Optuna): with
        ``values``, as ``state`` (PRUNED, FAIL), or failed without values. Optuna's checks:
        COMPLETE needs values, PRUNED and FAIL take none, RUNNING and WAITING are no state to
        tell, a finished trial is told again only with ``skip_if_finished`` (ValueError);
        without a state, values of the wrong number or none fail the trial with a warning."""
        _check_state_and_values(state, values)
        if state is None and values is not None:
            given = list(values) if isinstance(values, Sequence) else [values]
            if len(given) != len(self.directions):
                warnings.warn(
                    f"The number of the values {len(given)} did not match the number of the "
                    f"objectives {len(self.directions)}.",
                    stacklevel=2,
                )
                values = None  # told failed, as Optuna does
        elif state is None:
            warnings.warn("The value None could not be cast to float.", stacklevel=2)
        number = trial.number if isinstance(trial, Trial) else trial
        ref = trial.asked if isinstance(trial, Trial) else self._by_number(trial)
        try:
            if state == TrialState.PRUNED:
                record = self._study.tell(ref, state="pruned")
            elif state == TrialState.FAIL or values is None:
                record = self._study.tell(ref, state="failed")
            elif isinstance(values, Sequence):
                record = self._study.tell(ref, values=[float(v) for v in values])
            else:
                record = self._study.tell(ref, value=float(values))
        except errors.TrialFinished as exc:
            if not skip_if_finished:
                raise ValueError(f"Cannot tell a finished trial: {exc}") from exc
            record = self._study.client.trial(hpo_client._trial_id(ref))
        except errors.InvalidInput as exc:  # values the study refuses (their number...)
            raise ValueError(str(exc)) from exc
        finally:
            self._asked.pop(number, None)
        return self._frozen(record)

    def _records(self, states: Iterable[TrialState] | None = None) -> list[TrialRecord]:
        """The study's trials as stored (in ``states``, when given), without their reports."""
        records = self._study.trials()
        if states is None:
            return records
        wanted = set(states)
        return [r for r in records if _STATE_OF[str(r.state)] in wanted]

    def _frozen(self, record: TrialRecord) -> FrozenTrial:
        """One trial as Optuna shows it, with its reports (read when it has any)."""
        reported = {}
        if record.last_step is not None and len(self.directions) == 1:
            points = self._study.metrics(record.id, self._metric)
            reported = {p.step: p.value for p in points}
        return FrozenTrial.from_record(record, reported, self._space(record.params))

    def _space(self, names: Iterable[str]) -> dict[str, Any]:
        """The study's space, read again when it lacks one of ``names`` (a parameter
        learned since this object read it)."""
        space = self._study._record.spec.get("space") or {}
        if any(name not in space for name in names):
            space = self._study.refresh().spec.get("space") or {}
        return space

    def _by_number(self, number: int) -> Any:
        """The trial numbered ``number`` in this study: asked through this object (with its
        attempt's token), else looked up among its active trials, then among all; a ValueError
        when the study has none. A trial looked up is told naming no attempt: the server takes
        that only while the trial is on its first attempt (a process that lost its lease and
        knows only the number is refused, 409, once the trial was handed out again)."""
        if number in self._asked:
            return self._asked[number]
        for state in ("running,waiting", None):
            for record in self._study.trials(state=state):
                if record.number == number:
                    return record.id
        raise ValueError(f"study {self.study_name!r} has no trial number {number}")

    def enqueue_trial(
        self,
        params: Mapping[str, Any],
        user_attrs: Mapping[str, Any] | None = None,
        skip_if_exists: bool = False,
    ) -> None:
        if skip_if_exists and any(_fixed(r) == dict(params) for r in self._study.trials()):
            return
        record = self._study.enqueue_trial(dict(params))
        for key, value in (user_attrs or {}).items():
            self._study.set_user_attr(record.id, key, value)

    def add_trial(self, trial: FrozenTrial) -> None:
        self.add_trials([trial])

    def add_trials(self, trials: Iterable[FrozenTrial]) -> None:
        self._study.add_trials([hpo_client.frozen_trial_row(t) for t in trials])

    # ---------------------------------------------------------------- results

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    def get_trials(
        self, deepcopy: bool = True, states: Iterable[TrialState] | None = None
    ) -> list[FrozenTrial]:
        """The study's trials with their reports (``intermediate_values``: the objective's
        points, read together) and the distributions of their parameters."""
        records = self._records(states)
        reported: dict[int, dict[int, float]] = {}
        if len(self.directions) == 1 and any(r.last_step is not None for r in records):
            for p in self._study.study_metrics(self._metric):
                reported.setdefault(p.trial_id, {})[p.step] = p.value
        space = self._space(name for r in records for name in r.params)
        return [FrozenTrial.from_record(r, reported.get(r.id), space) for r in records]

    @property
    def best_trial(self) -> FrozenTrial:
        return self._frozen(self._best_record())

    def _best_record(self) -> TrialRecord:
        if len(self.directions) > 1:
            raise RuntimeError("a multi-objective study has `best_trials`, not `best_trial`")
        best = self._study.best_trial
        if best is None:
            raise ValueError("no trials are completed yet")
        return best

    @property
    def best_trials(self) -> list[FrozenTrial]:
        """The Pareto front; with one objective, every complete trial with the best value
        (ties included, as in Optuna; with constraints, the best feasible trial alone)."""
        if len(self.directions) > 1:
            return [self._frozen(r) for r in self._study.best_trials]
        best = self._study.best_trial
        if best is None:
            return []
        if self._study.record.spec.get("constraints"):  # ties may be infeasible: not told here
            return [self._frozen(best)]
        tied = [r for r in self._study.trials(state="complete") if r.value == best.value]
        return [self._frozen(r) for r in tied]

    # Optuna names Study has no counterpart for: said, not a bare AttributeError
    __getattr__ = _unmapped_method(
        "Study",
        {
            "set_metric_names": "each objective is named by its `metric` in the study's spec",
            "metric_names": "each objective is named by its `metric` in the study's spec",
            "system_attrs": "user attributes (set_user_attr) are stored; system ones are not",
            "set_system_attr": "user attributes (set_user_attr) are stored; system ones are not",
        },
    )

    @property
    def best_value(self) -> float:  # (from the record: no need for its reports)
        return FrozenTrial.from_record(self._best_record()).value  # type: ignore[return-value]

    @property
    def best_params(self) -> dict[str, Any]:
        return dict(self._best_record().params)

    @property
    def user_attrs(self) -> dict[str, Any]:
        return dict(self._study.refresh().spec.get("user_attrs") or {})

    def set_user_attr(self, key: str, value: Any) -> None:
        """Set a study-level user attribute (stored with the study on the server)."""
        self._study.set_study_user_attrs({key: value})

    def trials_dataframe(
        self,
        attrs: Sequence[str] = DATAFRAME_ATTRS,
        multi_index: bool = False,
    ) -> Any:
        """One row per trial, Optuna's way: a column group per name in ``attrs``, in that
        order (``params``, ``user_attrs``, ``intermediate_values`` and a multi-objective
        study's ``values`` spread over one column each, sorted); flat ``params_x`` names, or
        ``(params, x)`` pairs with ``multi_index``. No trials: an empty frame, as Optuna's."""
        pd = hpo_client._pandas()
        trials = self.trials
        if not trials:
            return pd.DataFrame()
        multi = len(self.directions) > 1
        attrs = tuple("values" if multi and a == "value" else a for a in attrs)
        groups: dict[str, set[tuple[str, Any]]] = {a: set() for a in attrs}
        records = []
        for t in trials:
            record: dict[tuple[str, Any], Any] = {}
            for attr in attrs:
                column = attr.removeprefix("_")
                if attr == "values":
                    values = t.values or [None] * len(self.directions)
                    cells = list(enumerate(values))
                elif attr == "value":
                    cells = [("", t.values[0] if t.values else None)]
                else:
                    value = getattr(t, attr)
                    if isinstance(value, TrialState):
                        value = value.name
                    cells = list(value.items()) if isinstance(value, dict) else [("", value)]
                for key, cell in cells:
                    record[column, key] = cell
                    groups[attr].add((column, key))
            records.append(record)
        columns = [c for attr in attrs for c in _sorted(groups[attr])]
        frame = pd.DataFrame(records, columns=pd.MultiIndex.from_tuples(columns))
        if not multi_index:
            frame.columns = ["_".join(str(p) for p in c if p != "") for c in columns]
        return frame

    @property
    def _metric(self) -> str:
        return self._metrics[0]


def _sorted(columns: set[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """A group's columns in order: by name, or by step (``intermediate_values``)."""
    try:
        return sorted(columns)
    except TypeError:  # names of more than one type
        return sorted(columns, key=lambda c: (c[0], str(c[1])))


class StudyDirection(enum.IntEnum):
    NOT_SET = 0
    MINIMIZE = 1
    MAXIMIZE = 2


class _Run:
    """One ``optimize`` call: counts the trials it starts, shared by its jobs."""

    def __init__(
        self,
        study: Study,
        func: ObjectiveFunc,
        n_trials: int | None,
        timeout: float | None,
        catch: tuple[type[BaseException], ...],
        callbacks: list[Callback],
    ) -> None:
        self.study = study
        self.func = func
        self.n_trials = n_trials
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.catch = catch
        self.callbacks = callbacks
        self.started = 0
        self.stopped = False  # Study.stop(): start no further trial
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        spec = study._study._record.spec
        self.interval_s = max(0.05, float(spec.get("lease_s", 300.0)) / 3)

    def _claim(self) -> bool:
        with self.lock:
            if self.error is not None or self.stopped:
                return False
            if self.n_trials is not None and self.started >= self.n_trials:
                return False
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return False
            self.started += 1
            return True

    def loop(self) -> None:
        client_study = self.study._study
        while self._claim():
            try:
                asked = client_study.ask()
            except errors.BudgetSpent:  # a grid exhausted, a budget spent
                return
            trial = Trial(self.study, asked)
            run_trial(client_study, self.func, trial, self.catch, self.interval_s)
            if self.callbacks:
                frozen = self.study._frozen(client_study.client.trial(asked.trial_id))
                for callback in self.callbacks:
                    callback(self.study, frozen)

    def loop_catching(self) -> None:
        try:
            self.loop()
        except BaseException as exc:
            with self.lock:
                self.error = self.error or exc


def create_study(
    *,
    storage: str | None = None,
    sampler: BaseSampler | None = None,
    pruner: BasePruner | None = None,
    study_name: str | None = None,
    direction: str | StudyDirection | None = None,
    load_if_exists: bool = False,
    directions: Sequence[str | StudyDirection] | None = None,
) -> Study:
    """A new study on the hpo server at ``storage`` (see the module docstring), or with
    ``load_if_exists`` the one of that name (refused, 409, when its directions differ)."""
    sampler = sampler or TPESampler()
    pruner = pruner or MedianPruner()
    names = _directions(direction, directions)
    objective: Any = (
        {"metric": "value", "direction": names[0]}
        if len(names) == 1
        else [{"metric": f"values_{i}", "direction": d} for i, d in enumerate(names)]
    )
    spec = {
        "name": study_name or f"optuna-{uuid.uuid4().hex[:12]}",
        "objective": objective,
        "sampler": sampler.spec,
        "pruner": pruner.spec if len(names) == 1 else {"type": "none"},
        "space": sampler.space,
        "define_by_run": True,
    }
    client = _client(storage)
    try:
        return Study(client.create_study(spec, load_if_exists=load_if_exists))
    except errors.NameTaken as exc:
        raise DuplicatedStudyError(
            f"Another study with name '{spec['name']}' already exists."
        ) from exc


def load_study(
    *, study_name: str, storage: str | None = None, sampler: Any = None, pruner: Any = None
) -> Study:
    """The study of that name on the server; KeyError when there is none, as in Optuna."""
    return Study(_existing(storage, study_name))


def delete_study(*, study_name: str, storage: str | None = None) -> None:
    """Delete the study of that name on the server; KeyError when there is none."""
    _existing(storage, study_name).delete()


def _existing(storage: str | None, study_name: str) -> hpo_client.Study:
    missing = f"Record does not exist: no study named {study_name!r}"
    if str(study_name).isdigit():  # a name, never an id: no study is named with digits only
        raise KeyError(missing)
    try:
        return _client(storage).study(study_name)
    except errors.NotFound as exc:
        raise KeyError(missing) from exc


class MaxTrialsCallback:
    """Optuna's callback that stops ``optimize`` once the study holds ``n_trials`` trials in
    ``states`` (all of its trials, any process's; by default the complete ones)."""

    def __init__(
        self, n_trials: int, states: Sequence[TrialState] | None = (TrialState.COMPLETE,)
    ) -> None:
        self._n_trials = n_trials
        self._states = states

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        # counted from the stored trials alone: get_trials would read every report too
        if len(study._records(self._states)) >= self._n_trials:
            study.stop()


def get_all_study_names(storage: str | None = None) -> list[str]:
    """The names of every study on the server (hpo's own studies too)."""
    return [s.name for s in _client(storage).studies()]


def _directions(
    direction: str | StudyDirection | None, directions: Sequence[str | StudyDirection] | None
) -> list[str]:
    if direction is not None and directions is not None:
        raise ValueError("give `direction` or `directions`, not both")
    given = list(directions) if directions is not None else [direction or "minimize"]
    out = []
    for d in given:
        name = d.name.lower() if isinstance(d, StudyDirection) else str(d).lower()
        if name not in ("minimize", "maximize"):
            raise ValueError(f"direction must be 'minimize' or 'maximize', got {d!r}")
        out.append(name)
    return out


def _client(storage: str | None) -> hpo_client.Client:
    url = storage or os.environ.get("HPO_URL") or hpo_client.DEFAULT_URL
    if not url.startswith(("http://", "https://")):
        raise ValueError(
            f"storage must be the URL of an hpo server (http://host:port), got {url!r}; "
            "to import trials from an Optuna storage use study.add_trials of hpo's client"
        )
    return hpo_client.Client(url)


def _check_state_and_values(
    state: TrialState | None, values: float | Sequence[float] | None
) -> None:
    """Optuna's checks of what ``tell`` is given (ValueError)."""
    if state == TrialState.COMPLETE and values is None:
        raise ValueError(
            "No values were told. Values are required when state is TrialState.COMPLETE."
        )
    if state in (TrialState.PRUNED, TrialState.FAIL) and values is not None:
        raise ValueError(
            "Values were told. Values cannot be specified when state is TrialState.PRUNED or "
            "TrialState.FAIL."
        )
    if state in (TrialState.RUNNING, TrialState.WAITING):
        raise ValueError(f"Cannot tell with state {state}.")


def _fixed(record: Any) -> dict[str, Any]:
    """The parameters a trial was enqueued (or asked) with, where it had fixed ones (what
    Optuna's ``enqueue_trial(skip_if_exists=True)`` compares), else all of its params."""
    fixed = (record.suggestion or {}).get("fixed")
    if not fixed:
        return dict(record.params)
    return {name: record.params[name] for name in fixed if name in record.params}
