"""Python client for the hpo REST API: notebooks, scripts and the ``hpo`` CLI use it.

>>> from hpo.api.client import Client
>>> c = Client("http://127.0.0.1:8000")          # token from HPO_TOKEN or hpo serve's token file
>>> study = c.create_study("study.yaml")
>>> t = study.ask()
>>> study.report(t, step=1, metrics={"val_loss": 0.4})   # True when the trial should stop
>>> study.tell(t, value=0.91)
>>> study.best_trial, study.trials_dataframe()
>>> study.continue_(10)                             # 10 more trials, a completed study too
>>> study.enqueue_trial({"lr": 0.01}); study.add_trials(other_study)   # warm start

``study.optimize(objective, n_trials)`` runs an objective in this process, heartbeating each
trial while it runs and telling every outcome (NaN, None and exceptions as failed, with why).
Calls that may safely be sent twice are retried on transport failures and 503/429
(:mod:`hpo.api.retry`); ``ask`` carries an ``Idempotency-Key`` for that.

Running an objective (the trial handle, its heartbeat, telling its outcome) is in
:mod:`hpo.api.objective`. This module stays one piece past 400 lines because it is the whole
REST surface a notebook sees: one method per call, on ``Client`` and ``Study``.

Imports neither the server nor torch/ray. Errors are the core's typed exceptions
(``hpo.service.errors``): NotFound, Conflict (BudgetSpent, GridExhausted...), InvalidInput.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from hpo.api.objective import TrialHandle, run_trial
from hpo.api.retry import ACTED_BEFORE, Outage, RetryPolicy, send
from hpo.service import errors
from hpo.service.export import newest_versions
from hpo.service.records import (
    Lineage,
    MetricPointRecord,
    StudyRecord,
    TrialMetricPoint,
    TrialRecord,
)
from hpo.service.spec import StudySpec, describe_errors

DEFAULT_URL = "http://127.0.0.1:8000"
# An idle pooled connection is dropped after this long. It must be shorter than the server's
# keep-alive (uvicorn closes idle connections after 5 s): a request sent on a connection the
# server is closing at that moment is lost with "connection reset".
KEEPALIVE_EXPIRY_S = 2.0
# A GP or TPE ask over many trials can take much longer than any other call.
ASK_TIMEOUT_S = 300.0
# Finished trials sent per import request: at most this many, and this many bytes of JSON
# (the server's body limit is 8 MiB by default; a row's user attributes may be 64 KiB).
IMPORT_CHUNK = 1000
IMPORT_CHUNK_BYTES = 4 * 2**20
log = logging.getLogger(__name__)
_ERRORS: dict[str, type[errors.HpoError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidInput,
        errors.NotFound,
        errors.Conflict,
        errors.NameTaken,
        errors.StudyNotRunning,
        errors.BudgetSpent,
        errors.GridExhausted,
        errors.ConcurrencyLimit,
        errors.TrialFinished,
    )
}


class Unauthorized(errors.HpoError):
    code = "unauthorized"


class AskedTrial(dict):
    """A trial handed out by :meth:`Study.ask`: ``{"trial_id", "number", "params", "attempt",
    "attempt_token"}``. Passed to ``report``, ``heartbeat`` and ``tell``, it sends them with
    its attempt's own token, so a late write of an attempt the server has replaced is refused
    (409) instead of being stored."""

    @property
    def trial_id(self) -> int:
        return self["trial_id"]

    @property
    def number(self) -> int:
        return self["number"]

    @property
    def params(self) -> dict[str, Any]:
        return self["params"]

    @property
    def attempt_token(self) -> str | None:
        return self.get("attempt_token")


TrialRef = int | Mapping[str, Any] | TrialRecord


def _asked(trial: Any) -> Any:
    """The trial an ``optimize`` objective's handle (a TrialHandle) was asked as; any other
    reference as it is."""
    asked = getattr(trial, "asked", None)
    return asked if isinstance(asked, AskedTrial) else trial


def _trial_id(trial: TrialRef) -> int:
    trial = _asked(trial)
    if isinstance(trial, int):
        return trial
    if isinstance(trial, TrialRecord):
        return trial.id
    return int(trial["trial_id"] if "trial_id" in trial else trial["id"])


def _attempt_auth(trial: TrialRef) -> dict[str, str]:
    """The headers of a write for ``trial``: its attempt's token when the reference carries
    one (an AskedTrial), else none (the client's own token is sent)."""
    trial = _asked(trial)
    token = trial.get("attempt_token") if isinstance(trial, Mapping) else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def _attempt_of(trial: TrialRef) -> dict[str, int]:
    """``{"attempt": n}`` when the reference names the attempt it was asked for (an
    AskedTrial), else ``{}``. Sent with every write, so the server fences it to that attempt
    whichever token carries it (an API-token write naming no attempt is refused once the
    trial was handed out again)."""
    trial = _asked(trial)
    attempt = trial.get("attempt") if isinstance(trial, Mapping) else None
    return {"attempt": attempt} if isinstance(attempt, int) else {}


def default_token() -> str | None:
    """``HPO_TOKEN``, else the token file a local ``hpo serve`` wrote."""
    if os.environ.get("HPO_TOKEN"):
        return os.environ["HPO_TOKEN"]
    from hpo.service.settings import Settings

    return Settings().api_token()


def server_url(url: str | None = None) -> str:
    """The server a client and every ``hpo`` command talk to: ``url``, else ``$HPO_URL``,
    else :data:`DEFAULT_URL`."""
    return (url or os.environ.get("HPO_URL") or DEFAULT_URL).rstrip("/")


class Client:
    """A connection to one hpo server.

    ``timeout`` bounds every call but ``ask``, which gets ``ask_timeout``. Idempotent calls
    (GETs, tell, metric reports, heartbeats, asks with their idempotency key) are retried on
    transport failures and 503/429 as ``retry`` allows (see :mod:`hpo.api.retry`).
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        ask_timeout: float = ASK_TIMEOUT_S,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.url = server_url(url)
        self.ask_timeout = ask_timeout
        self.retry = retry or RetryPolicy()
        token = (token if token is not None else default_token() or "").strip()
        if not token.isascii() or not token.isprintable():
            raise ValueError(
                "the API token holds characters an HTTP header cannot carry (non-ASCII or "
                "control characters): copy it again from hpo serve's token file"
            )
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Failed connections are retried by hpo.api.retry with the rest, not by the transport.
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ http

    def request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool | None = None,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send a request; raise the core's typed error for a 4xx/5xx answer.

        ``idempotent`` (default: true for GET and HEAD) says whether sending it twice is
        harmless, which allows retrying it after a transport failure or a 503; ``retry``
        overrides the client's policy. Raises ``httpx.TransportError`` when the server could
        not be reached in the tries allowed.
        """
        if idempotent is None:
            idempotent = method.upper() in ("GET", "HEAD")
        if "json" in kwargs:
            kwargs["json"] = _plain(kwargs["json"])  # numpy numbers, as Optuna takes them
        if "json" in kwargs and (found := _not_finite(kwargs["json"])) is not None:
            where, value = found  # JSON has no NaN: said here, naming where it is
            raise errors.InvalidInput(f"{where}: must be a finite number, got {value}", field=where)
        built = self._http.build_request(method, path, **kwargs)
        response = send(self._http, built, idempotent=idempotent, policy=retry or self.retry)
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return _body(self.request(method, "/api/v1" + path, **kwargs))

    def health(self, *, retry: RetryPolicy | None = None) -> dict[str, Any]:
        """``/healthz`` (a 503 raises, after the client's retries unless ``retry`` says
        otherwise)."""
        return _body(self.request("GET", "/healthz", retry=retry))

    # --------------------------------------------------------------- studies

    def create_study(
        self, spec: StudySpec | Mapping[str, Any] | str | Path, *, load_if_exists: bool = False
    ) -> Study:
        """Create a study from a spec (a dict, a YAML file path, YAML text or a StudySpec).

        The spec is validated here first, so a typo fails before any request is sent.
        With ``load_if_exists``, a study of the same name is returned instead of a 409 when
        its objective and space match the spec (a Conflict naming what differs otherwise).
        """
        spec = _to_spec(spec)
        params = {"load_if_exists": "true"} if load_if_exists else {}
        answer = self.request("POST", "/api/v1/studies", json=spec.to_json(), params=params)
        study = Study(self, StudyRecord.model_validate(_body(answer)))
        study.created = answer.status_code == 201  # 200: loaded (load_if_exists)
        study.kept = [] if study.created else _kept_settings(spec, study._record.spec)
        if study.kept:
            hint = " (a budget changes with Study.set_budget)" if "budget" in study.kept else ""
            warnings.warn(
                f"study {study.name!r} loaded: it keeps its stored {', '.join(study.kept)}, "
                f"not this spec's{hint}",
                stacklevel=2,
            )
        return study

    def study(self, ref: int | str) -> Study:
        """An existing study by id or name."""
        if isinstance(ref, int) or str(ref).isdigit():
            return Study(self, StudyRecord.model_validate(self._json("GET", f"/studies/{ref}")))
        page = self._json("GET", "/studies", params={"name": ref})
        if not page["studies"]:
            raise errors.StudyNotFound(ref)
        return Study(self, StudyRecord.model_validate(page["studies"][0]))

    def studies(self, state: str | None = None) -> list[StudyRecord]:
        """Every study (newest first), following pagination."""
        out: list[StudyRecord] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 200}
            if state:
                params["state"] = state
            if cursor is not None:
                params["cursor"] = cursor
            page = self._json("GET", "/studies", params=params)
            out.extend(StudyRecord.model_validate(s) for s in page["studies"])
            cursor = page.get("next_cursor")
            if cursor is None:
                return out

    def trial(self, trial_id: int) -> TrialRecord:
        return TrialRecord.model_validate(self._json("GET", f"/trials/{trial_id}"))


class Study:
    """A study on the server: ask/tell, metric reports, results and control."""

    def __init__(self, client: Client, record: StudyRecord) -> None:
        self.client = client
        self.id = record.id
        self.name = record.name
        self._record = record
        # From Client.create_study: True when it created the study, False when it loaded a
        # stored one (load_if_exists); None for a study looked up.
        self.created: bool | None = None
        # From Client.create_study, for a study it loaded: the stored settings it keeps where
        # the spec given said otherwise (budget, sampler, pruner).
        self.kept: list[str] = []

    def __repr__(self) -> str:
        return f"Study(id={self.id}, name={self.name!r}, state={self._record.state!r})"

    # --------------------------------------------------------------- ask/tell

    def ask(self, params: Mapping[str, Any] | None = None) -> AskedTrial:
        """A trial to run: ``{"trial_id", "number", "params"}``. ``params`` fixes values of a
        new trial (the sampler fills in the rest; InvalidInput names one outside the space).

        Raises BudgetSpent / GridExhausted when nothing is left, ConcurrencyLimit when
        ``max_concurrent`` trials are already running, StudyNotRunning when paused or stopped.
        """
        # One key per logical ask, the same on every retry of it: a server that honours the
        # key answers a repeated ask with the trial the first one created.
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        body = {"json": {"params": dict(params)}} if params is not None else {}
        data = self.client._json(
            "POST",
            f"/studies/{self.id}/ask",
            headers=headers,
            timeout=self.client.ask_timeout,
            idempotent=True,
            **body,
        )
        return AskedTrial(data)

    def enqueue_trial(self, params: Mapping[str, Any]) -> TrialRecord:
        """Queue a trial with ``params``: the next ask hands it out before any new suggestion.
        It is part of ``max_trials`` (raised when the queue passes it); a completed study runs
        again for it."""
        data = self.client._json("POST", f"/studies/{self.id}/queue", json={"params": params})
        return TrialRecord.model_validate(data)

    def add_trials(
        self, source: Study | Sequence[Mapping[str, Any]] | str, *, study_name: str | None = None
    ) -> list[TrialRecord]:
        """Import finished trials so this study warm-starts from them (its samplers learn from
        them; they do not spend ``max_trials``). ``source`` is another :class:`Study` (its
        complete, pruned and failed trials), a list of ``{"params", "value" | "values",
        "state", "user_attrs"}``, or an Optuna storage URL (``sqlite:///optuna.db``, with
        ``study_name`` when it holds several studies; needs ``optuna`` installed)."""
        if isinstance(source, Study):
            rows = [_finished(t) for t in source.trials("complete,pruned,failed")]
        elif isinstance(source, str):
            rows = _optuna_trials(source, study_name)
        else:
            rows = [dict(t) for t in source]
        out: list[TrialRecord] = []
        for start, stop in _chunks(rows):
            try:
                data = self.client._json(
                    "POST", f"/studies/{self.id}/trials", json={"trials": rows[start:stop]}
                )
            except errors.InvalidInput as exc:  # its row is counted in this request
                raise _shifted(exc, start) from exc
            out.extend(TrialRecord.model_validate(t) for t in data["trials"])
        return out

    def set_user_attr(self, trial: TrialRef, key: str, value: Any) -> TrialRecord:
        """Attach ``key: value`` (JSON) to a trial, in any state; read back in
        ``TrialRecord.user_attrs`` and the ``user_attrs_<key>`` columns of the DataFrame."""
        path = f"/trials/{_trial_id(trial)}/user_attrs"
        data = self.client._json(
            "POST", path, json={key: value}, headers=_attempt_auth(trial), idempotent=True
        )
        return TrialRecord.model_validate(data)

    def suggest(self, trial: TrialRef, name: str, param: Mapping[str, Any]) -> Any:
        """The value of parameter ``name`` (a ``space`` entry such as ``{"type": "float",
        "low": 0, "high": 1}``) for a running trial of a define-by-run study: the server
        learns it on first use. Asking again answers the same value."""
        path = f"/trials/{_trial_id(trial)}/suggest"
        body = {"name": name, "param": dict(param)}
        data = self.client._json(
            "POST", path, json=body, headers=_attempt_auth(trial), idempotent=True
        )
        return data["value"]

    def continue_(self, n_trials: int) -> StudyRecord:
        """Allow ``n_trials`` more trials than were handed out so far (``max_trials`` =
        handed out + ``n_trials``, never lowered: a budget that allows more already stays);
        a completed study runs again (its scheduler launches them, or your asks get them).
        The budget is read, then set: a raise by another client in between is overwritten."""
        if n_trials < 1:
            raise ValueError("n_trials must be at least 1")
        record = self.refresh()
        wanted = record.n_trials + n_trials
        current = (record.spec.get("budget") or {}).get("max_trials")
        if record.state in ("running", "paused") and (current is None or current >= wanted):
            return record  # it allows that many already: never lowered
        return self.set_budget(max_trials=wanted if current is None else max(current, wanted))

    def report(self, trial: TrialRef, step: int, metrics: Mapping[str, float]) -> bool:
        """Report metric values at ``step``; returns True when the trial should stop
        (the pruner stopped it, or the study was stopped). Optuna's ``(value, step)`` order
        is taken by the trial handle's ``report``; here it is a TypeError."""
        if not isinstance(metrics, Mapping):
            raise TypeError(
                "Study.report(trial, step, metrics) takes metrics as {name: value}; got "
                f"{metrics!r} (Optuna's trial.report(value, step) is the handle's report)"
            )
        for name, value in metrics.items():  # JSON has no NaN: said here, naming the metric
            if isinstance(value, numbers.Real) and not math.isfinite(value):  # numpy's too
                raise errors.InvalidInput(
                    f"metrics.{name}: must be a finite number, got {value}",
                    field=f"metrics.{name}",
                )
        points = [{"step": step, "name": k, "value": v} for k, v in metrics.items()]
        # Points are keyed by (trial, attempt, name, step) on the server: sending them again
        # after a lost answer stores nothing twice.
        answer = self.client._json(
            "POST",
            f"/trials/{_trial_id(trial)}/metrics",
            json={"points": points, **_attempt_of(trial)},
            headers=_attempt_auth(trial),
            idempotent=True,
        )
        return bool(answer["should_stop"])

    def heartbeat(self, trial: TrialRef, *, retry: RetryPolicy | None = None) -> bool:
        """Keep a long-running trial's lease alive without reporting metrics; returns whether
        the trial should stop."""
        path = f"/trials/{_trial_id(trial)}/heartbeat"
        headers, params = _attempt_auth(trial), _attempt_of(trial)
        answer = self.client._json(
            "POST", path, headers=headers, params=params, idempotent=True, retry=retry
        )
        return bool(answer["should_stop"])

    def tell(
        self,
        trial: TrialRef,
        value: float | None = None,
        *,
        values: list[float] | None = None,
        state: str | None = None,
        error: str | None = None,
    ) -> TrialRecord:
        """Finish a trial with its value (or ``values``), or ``state="failed"|"pruned"``. A
        value that is NaN or infinite fails the trial, with a warning (Optuna fails a NaN;
        the server stores only finite values)."""
        value, values = _plain(value), _plain(values)
        told = [value] if value is not None else list(values or [])
        finite = [v for v in told if isinstance(v, (int, float))]  # others: the server's 422
        if state in (None, "complete") and not all(math.isfinite(v) for v in finite):
            error = f"told a value that is not finite: {told[0] if value is not None else told}"
            warnings.warn(f"trial {_trial_id(trial)} failed: {error}", stacklevel=2)
            value, values, state = None, None, "failed"
        body: dict[str, Any] = {**_attempt_of(trial)}
        if value is not None:
            body["value"] = value
        if values is not None:
            body["values"] = values
        if state is not None:
            body["state"] = state
        if error is not None:
            body["error"] = error
        # The same tell again is a no-op on the server, so a retry after a lost answer is safe.
        path = f"/trials/{_trial_id(trial)}/tell"
        headers = _attempt_auth(trial)
        data = self.client._json("POST", path, json=body, headers=headers, idempotent=True)
        return TrialRecord.model_validate(data)

    def optimize(
        self,
        objective: Callable[[TrialHandle], float | list[float]],
        n_trials: int | None = None,
        *,
        catch: tuple[type[BaseException], ...] = (),
    ) -> None:
        """Run ``objective`` in this process, Optuna style: ``n_trials`` trials (raising a spent
        ``max_trials`` as needed, so a loaded or completed study runs that many more), or
        without ``n_trials`` until the study's budget is spent. ``objective`` may call
        ``trial.report(step, metrics)`` (or Optuna's ``trial.report(value, step)``) and should
        return when it answers True (the trial was pruned) or raise ``TrialPruned``.

        Every trial asked is told before the next one: its value(s); ``pruned`` when the
        server said it should stop; ``failed`` with the reason when the objective returned
        NaN, inf, None or anything not a number, or raised. An exception in ``catch`` is
        logged with its traceback and the next trial runs; any other exception
        (KeyboardInterrupt included) is re-raised once the trial is told failed. While the
        objective runs, a background thread heartbeats the trial about three times per
        ``lease_s``, so a long objective that never reports keeps its trial.
        """
        interval_s = max(0.05, float(self._record.spec.get("lease_s", 300.0)) / 3)
        metric = self.objective_metric
        done = 0
        while n_trials is None or done < n_trials:
            asked = self._ask_within(n_trials, done)
            if asked is None:
                return
            run_trial(self, objective, TrialHandle(self, asked, metric), catch, interval_s)
            done += 1

    @property
    def objectives(self) -> list[dict[str, Any]]:
        """The study's objectives (``{"metric", "direction"}``), one or several."""
        objective = self._record.spec["objective"]
        return objective if isinstance(objective, list) else [objective]

    @property
    def objective_metric(self) -> str:
        """The study's (first) objective metric."""
        return self.objectives[0]["metric"]

    def _ask_within(self, n_trials: int | None, done: int) -> AskedTrial | None:
        """The next trial of an ``optimize`` that runs ``n_trials`` (None: until the budget
        is spent), or None when it is done. With ``n_trials``, a spent ``max_trials`` is
        raised for the trials still to run (a loaded or completed study runs them), but an
        exhausted grid or a study out of time ends the run."""
        try:
            return self.ask()
        except errors.GridExhausted:
            return None
        except errors.BudgetSpent as exc:
            if n_trials is None or exc.field != "budget.max_trials":
                return None
        try:
            self.continue_(n_trials - done)
        except errors.Conflict:  # it stays completed: its time, compute or grid is spent
            return None
        try:
            return self.ask()
        except errors.BudgetSpent:
            return None

    # ---------------------------------------------------------------- results

    def refresh(self) -> StudyRecord:
        self._record = StudyRecord.model_validate(self.client._json("GET", f"/studies/{self.id}"))
        return self._record

    @property
    def record(self) -> StudyRecord:
        return self.refresh()

    @property
    def state(self) -> str:
        return self.refresh().state

    @property
    def best_trial(self) -> TrialRecord | None:
        """The best complete trial (None before any completed). A multi-objective study
        has no single best: its Pareto front is :attr:`best_trials` (ValueError here)."""
        if len(self.objectives) > 1:
            raise ValueError(
                f"study {self.name!r} has {len(self.objectives)} objectives: its Pareto front is "
                "best_trials, not best_trial"
            )
        data = self.client._json("GET", f"/studies/{self.id}/best")
        best = data["best_trial"]
        return None if best is None else TrialRecord.model_validate(best)

    @property
    def best_trials(self) -> list[TrialRecord]:
        """The Pareto front (multi-objective), or the best trial alone."""
        data = self.client._json("GET", f"/studies/{self.id}/best")
        return [TrialRecord.model_validate(t) for t in data["best_trials"]]

    @property
    def best_params(self) -> dict[str, Any] | None:
        best = self.best_trial
        return None if best is None else best.params

    def lineage(self, trial: TrialRef | None = None) -> Lineage:
        """The schedule a fresh trial follows to train as ``trial`` (default: the best) did:
        a PBT trial's parameters over its steps, with the steps before each copy those of the
        trial it copied. Raises ValueError when the study has no complete trial yet."""
        if trial is None:
            trial = self.best_trial
            if trial is None:
                raise ValueError(f"study {self.name!r} has no complete trial yet")
        return Lineage.model_validate(
            self.client._json("GET", f"/trials/{_trial_id(trial)}/lineage")
        )

    def replay_spec(
        self, trial: TrialRef | None = None, *, trials: int = 1, name: str | None = None
    ) -> StudySpec:
        """A study that trains ``trials`` trials along ``trial``'s lineage (default: the best
        trial's), with this study's trainable, space, objective and resources:
        ``scheduler: {type: replay}``, no pruner. A PBT study's result reproduced."""
        lineage = self.lineage(trial)
        for problem in lineage.problems:
            warnings.warn(f"trial #{lineage.number}'s lineage: {problem}", stacklevel=2)
        spec = {k: v for k, v in self._record.spec.items() if k != "user_attrs"}
        spec["name"] = name or f"{self.name[:100]}-replay-{lineage.number}"
        spec["description"] = (
            f"replays trial #{lineage.number} (id {lineage.trial_id}) of study {self.name!r} "
            f"(id {self.id})"
        )
        spec["scheduler"] = {
            "type": "replay",
            "schedule": [s.model_dump() for s in lineage.schedule],
        }
        spec["pruner"] = {"type": "none"}
        # its parameters are the schedule's: no sampler's choice is used (a grid's would clash)
        spec["sampler"] = {"type": "random", "seed": spec.get("sampler", {}).get("seed")}
        spec["budget"] = {**spec.get("budget", {}), "max_trials": trials}
        return StudySpec.model_validate(spec)

    def trials(self, state: str | None = None) -> list[TrialRecord]:
        """Every trial (optionally of some states, comma separated), by number."""
        return sorted(self._iter_changed(state, None)[0], key=lambda t: t.number)

    def changed_trials(self, since: int | None) -> tuple[list[TrialRecord], int]:
        """Trials changed after cursor ``since`` and the new cursor (for polling)."""
        return self._iter_changed(None, since)

    def _iter_changed(self, state: str | None, since: int | None) -> tuple[list[TrialRecord], int]:
        """Every page changed after ``since``, each trial once (its newest version: one that
        changed between two pages comes back on the later one; with a ``state`` filter, one
        that left those states meanwhile stays as first read), and the last cursor."""
        out: list[TrialRecord] = []
        while True:
            params: dict[str, Any] = {}
            if state:
                params["state"] = state
            if since is not None:
                params["since"] = since
            page = self.client._json("GET", f"/studies/{self.id}/trials", params=params)
            out.extend(TrialRecord.model_validate(t) for t in page["trials"])
            if len(page["trials"]) < 1000:
                return newest_versions(out), page["cursor"]
            since = page["cursor"]

    def trials_dataframe(self) -> Any:
        """One row per trial: number, state, value(s), ``params_*``, attempts, timings."""
        pd = _pandas()
        from hpo.service.export import trial_rows

        try:
            spec = StudySpec.model_validate(self.refresh().spec)
        except ValueError as exc:  # the server's own record, not the caller's input
            raise errors.HpoError(
                f"study {self.id}'s stored spec does not read in this client ({exc}): "
                "a newer hpo server wrote it? upgrade hpo"
            ) from None
        columns, rows = trial_rows(self.trials(), [o.metric for o in spec.objectives])
        frame = pd.DataFrame(rows, columns=columns)
        for col in ("started_at", "finished_at"):
            frame[col] = pd.to_datetime(frame[col], utc=True, format="ISO8601")
        numeric = [c for c in columns if c == "value" or c.startswith("value_")]
        for col in [*numeric, "duration_s"]:  # floats (NaN where none), also with no trial
            frame[col] = pd.to_numeric(frame[col]).astype("float64")
        frame["last_step"] = pd.to_numeric(frame["last_step"])
        for col in ("number", "trial_id", "attempts"):
            frame[col] = frame[col].astype("int64")
        return frame

    def metrics(self, trial: TrialRef, name: str | None = None) -> list[MetricPointRecord]:
        params = {"name": name} if name else {}
        data = self.client._json("GET", f"/trials/{_trial_id(trial)}/metrics", params=params)
        return [MetricPointRecord.model_validate(p) for p in data["points"]]

    def study_metrics(
        self, name: str | None = None, *, page_trials: int = 100
    ) -> Iterator[TrialMetricPoint]:
        """Every metric point of every trial (of metric ``name``), trial by trial, each
        trial's in step order (of a step reported by several attempts, the newest
        attempt's), read a page of ``page_trials`` trials at a time."""
        after = None
        while True:
            params: dict[str, Any] = {"limit": page_trials}
            if name:
                params["name"] = name
            if after is not None:
                params["after"] = after
            data = self.client._json("GET", f"/studies/{self.id}/metrics", params=params)
            yield from (TrialMetricPoint.model_validate(p) for p in data["points"])
            after = data["cursor"]
            if after is None:
                return

    def metrics_dataframe(self, name: str | None = None) -> Any:
        """Every metric point of every trial: trial number, step, name, value, time."""
        columns = ["number", "trial_id", "step", "name", "value", "time"]
        rows = [p.model_dump(include=set(columns)) for p in self.study_metrics(name)]
        return _pandas().DataFrame(rows, columns=columns)

    def export_csv(self) -> str:
        return self.client.request("GET", f"/api/v1/studies/{self.id}/export.csv").text

    # ---------------------------------------------------------------- control

    def pause(self) -> StudyRecord:
        return self._patch({"state": "paused"})

    def resume(self) -> StudyRecord:
        return self._patch({"state": "running"})

    def stop(self) -> StudyRecord:
        return self._patch({"state": "stopped"})

    def set_budget(
        self,
        *,
        max_trials: int | None = None,
        max_concurrent: int | None = None,
        timeout_s: float | None = None,
        max_steps: int | None = None,
        max_worker_seconds: float | None = None,
    ) -> StudyRecord:
        """Change the study's budget (the fields given); a raised budget runs a completed
        study again. Raises Conflict naming the field when it would stay completed (a study
        whose ``timeout_s`` ran out needs ``timeout_s`` raised)."""
        budget = {
            "max_trials": max_trials,
            "max_concurrent": max_concurrent,
            "timeout_s": timeout_s,
            "max_steps": max_steps,
            "max_worker_seconds": max_worker_seconds,
        }
        given = {k: v for k, v in budget.items() if v is not None}
        return self._patch({"budget": given})

    def delete(self) -> None:
        """Delete the study with everything stored with it. Sent again after a 503 or a lost
        connection (a delete the server could not finish may have stopped the study). A copy
        sent again that finds the study gone returns when an earlier copy may have deleted it
        (its answer was lost, or was a 503); a study that was gone when first asked raises
        NotFound."""
        try:
            self.client.request("DELETE", f"/api/v1/studies/{self.id}", idempotent=True)
        except errors.NotFound as exc:
            if not (getattr(exc, "acted_before", False) and exc.field == "study_id"):
                raise

    def set_study_user_attrs(self, attrs: Mapping[str, Any]) -> StudyRecord:
        """Merge ``attrs`` (JSON) into the study's own user attributes, in any state (a key
        given None is removed); read back in ``record.spec["user_attrs"]``. A merge sent
        twice leaves what one leaves: it is sent again through a restart or an outage."""
        return self._patch({"user_attrs": dict(attrs)})

    def _patch(self, body: dict[str, Any]) -> StudyRecord:
        """PATCH the study. Each control call sets an absolute state or budget or merges user
        attributes, which sent twice leaves what sent once leaves, so it is sent again through
        a busy database's 503 or a lost answer, as ``tell`` is."""
        self._record = StudyRecord.model_validate(
            self.client._json("PATCH", f"/studies/{self.id}", json=body, idempotent=True)
        )
        return self._record

    def wait(
        self,
        *,
        poll_s: float = 2.0,
        timeout_s: float | None = None,
        give_up_after_s: float = 300.0,
    ) -> StudyRecord:
        """Block until the study is completed or stopped (``TimeoutError`` after
        ``timeout_s``). While the server cannot be reached or cannot serve (a restart, a
        database outage) it logs that once and goes on; its error is raised once that lasted
        ``give_up_after_s``, and at once for any other."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        outage = Outage(give_up_after_s)
        state = self._record.state  # as last seen
        while True:
            try:
                record = self.refresh()
            except Exception as exc:
                if message := outage.failed(exc):
                    log.warning("%s", message)
            else:
                if message := outage.answered():
                    log.info("%s", message)
                if record.state in ("completed", "stopped"):
                    return record
                state = record.state
            if deadline is not None and time.monotonic() > deadline:
                silent = "; the server does not answer" if outage.since is not None else ""
                raise TimeoutError(f"study {self.id} still {state} after {timeout_s} s{silent}")
            time.sleep(poll_s)


def _finished(trial: TrialRecord) -> dict[str, Any]:
    """A finished trial of another study as an import row."""
    row: dict[str, Any] = {"params": trial.params, "state": str(trial.state)}
    if trial.values is not None:
        row["values"] = trial.values
    elif trial.value is not None and trial.state != "failed":
        row["value"] = trial.value
    if trial.user_attrs:
        row["user_attrs"] = trial.user_attrs
    return row


def _optuna_trials(storage_url: str, study_name: str | None) -> list[dict[str, Any]]:
    """The finished trials of an Optuna study (in its own storage) as import rows."""
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("importing from an Optuna storage needs optuna installed") from exc
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    finished = tuple(optuna.trial.TrialState[name] for name in _IMPORTED_STATES)
    return [frozen_trial_row(t) for t in study.get_trials(deepcopy=False, states=finished)]


# The Optuna trial states a study imports, by their names in Optuna and here.
_IMPORTED_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}


def frozen_trial_row(trial: Any) -> dict[str, Any]:
    """An Optuna FrozenTrial (Optuna's own or ``hpo.optuna``'s) as a row of
    :meth:`Study.add_trials`. Raises ValueError for a trial that has not finished."""
    state = _IMPORTED_STATES.get(trial.state.name)
    if state is None:
        which = f"trial {trial.number}" if trial.number >= 0 else "a trial"  # create_trial: -1
        raise ValueError(
            f"{which} is {trial.state.name}: only finished trials (COMPLETE, PRUNED, FAIL) can "
            "be added"
        )
    row: dict[str, Any] = {"params": dict(trial.params), "state": state}
    values = trial.values
    if state == "complete" and values is not None:
        row["values" if len(values) > 1 else "value"] = (
            list(values) if len(values) > 1 else values[0]
        )
    if trial.user_attrs:
        row["user_attrs"] = dict(trial.user_attrs)
    return row


def _kept_settings(given: StudySpec, stored: Mapping[str, Any]) -> list[str]:
    """The settings a study loaded by its spec kept from its stored spec, where ``given``
    said otherwise: its budget, sampler, pruner, resources, retries... (every field but those
    the server checked to be the same: name, objective, space, trainable)."""
    try:
        kept = StudySpec.model_validate(stored)
    except ValueError:  # a spec of a newer server, with fields this client does not know
        return []
    out = [
        name
        for name in StudySpec.model_fields
        if name not in (*_LOADED_BY, "user_attrs") and getattr(kept, name) != getattr(given, name)
    ]
    # user attributes grow as a study runs (set_user_attr): kept only where the spec's differ
    if any(kept.user_attrs.get(k) != v for k, v in given.user_attrs.items()):
        out.append("user_attrs")
    return out


# What a study loaded by its spec (load_if_exists) is matched on: never kept otherwise.
_LOADED_BY = ("name", "objective", "space", "trainable")


def _chunks(rows: Sequence[Any]) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each import request: ``IMPORT_CHUNK`` rows at most, and
    ``IMPORT_CHUNK_BYTES`` of JSON unless one row alone is larger (the server judges it)."""
    start, size = 0, 0
    for i, row in enumerate(rows):
        n = len(json.dumps(_plain(row), default=str)) + 1
        if i > start and (i - start >= IMPORT_CHUNK or size + n > IMPORT_CHUNK_BYTES):
            yield start, i
            start, size = i, 0
        size += n
    if start < len(rows):
        yield start, len(rows)


def _shifted(exc: errors.InvalidInput, start: int) -> errors.InvalidInput:
    """``exc`` about row k of a request that began at row ``start``, naming row start + k
    and saying that the rows before ``start`` were imported (a rerun sends the rest)."""

    def shift(text: str) -> str:
        return re.sub(r"trials\[(\d+)\]", lambda m: f"trials[{int(m[1]) + start}]", text, count=1)

    message = shift(exc.message)
    if start:
        message += f" (trials[0:{start}] were imported; nothing from trials[{start}] on)"
    shifted = type(exc).__new__(type(exc))
    errors.HpoError.__init__(shifted, message, field=shift(exc.field) if exc.field else None)
    shifted.__dict__.update(
        {k: v for k, v in exc.__dict__.items() if k not in ("message", "field")}
    )
    return shifted


def _plain(body: Any) -> Any:
    """``body`` with numpy's scalars and 0-d arrays (``np.float32(0.5)``, ``np.int64(3)``,
    ``np.array(0.25)``) made Python numbers, which JSON encodes; the rest as it is."""
    if isinstance(body, Mapping):
        return {key: _plain(v) for key, v in body.items()}
    if isinstance(body, (list, tuple)):
        return [_plain(v) for v in body]
    if type(body).__module__ == "numpy" and getattr(body, "ndim", None) == 0:
        return body.item()
    return body


def _not_finite(body: Any, path: str = "") -> tuple[str, float] | None:
    """Where the first NaN or infinity in a JSON body is (``trials[0].value``) and what."""
    if isinstance(body, float):
        return None if math.isfinite(body) else (path or "body", body)
    items: Any = ()
    if isinstance(body, Mapping):
        items = ((f"{path}.{key}" if path else str(key), v) for key, v in body.items())
    elif isinstance(body, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(body))
    for where, value in items:
        if (found := _not_finite(value, where)) is not None:
            return found
    return None


def _to_spec(spec: StudySpec | Mapping[str, Any] | str | Path) -> StudySpec:
    """The spec, checked here before any request; a bad one raises InvalidInput naming the
    field, as the server's 422 would (pydantic's own error is its cause)."""
    if isinstance(spec, StudySpec):
        return spec
    try:
        if isinstance(spec, Mapping):
            return StudySpec.model_validate(dict(spec))
        return StudySpec.from_yaml(spec)
    except ValidationError as exc:
        first = describe_errors(exc)[0]
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise errors.InvalidInput(
            f"{first['field']}: {first['message']}{more}", field=first["field"]
        ) from exc


def _body(response: httpx.Response) -> dict[str, Any]:
    """A successful answer's JSON object. Raises HpoError naming the URL when it is none
    (every answer of the API is an object): the URL is not an hpo server's API."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        kind = response.headers.get("content-type") or "no content type"
        raise errors.HpoError(
            f"{response.request.method} {response.request.url} answered HTTP "
            f"{response.status_code} ({kind}) with no JSON object, as an hpo server never "
            "does: is the URL an hpo server's (--url, $HPO_URL)?"
        )
    return body


def _error_from(response: httpx.Response) -> errors.HpoError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"message": response.text[:200] or response.reason_phrase}
    message = body.get("message") or body.get("detail") or response.reason_phrase
    code = body.get("error", "")
    if not code:  # not an hpo error body: say where it came from (a wrong URL, a proxy)
        message = f"{message} (from {response.request.method} {response.request.url})"
    if response.status_code == 401:
        cls: type[errors.HpoError] = Unauthorized
    elif code in _ERRORS:
        cls = _ERRORS[code]
    elif response.status_code == 404:
        cls = errors.NotFound
    elif response.status_code == 409:
        cls = errors.Conflict
    elif response.status_code == 422:
        cls = errors.InvalidInput
    else:
        cls = errors.HpoError
    err = cls.__new__(cls)
    errors.HpoError.__init__(
        err, f"HTTP {response.status_code}: {message}", field=body.get("field")
    )
    err.status_code = response.status_code  # type: ignore[attr-defined]
    err.acted_before = response.extensions.get(ACTED_BEFORE, False)  # type: ignore[attr-defined]
    return err


def _pandas() -> Any:
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("trials_dataframe() needs pandas: pip install 'hpo[dataframe]'") from exc
    return pd
