"""Running an objective in the notebook's process: the trial handle it gets, the heartbeat that
keeps its lease while it runs, and how its outcome is told (:meth:`Study.optimize` uses these).

It knows the study only through :class:`TrialTeller` (the client's ``Study`` is one), so it
imports nothing of the client.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from hpo.api.retry import RetryPolicy
from hpo.service import errors

log = logging.getLogger("hpo.api.client")


class TrialTeller(Protocol):
    """What running a trial needs of a study: report, heartbeat and tell by the asked trial."""

    def report(self, trial: Any, step: int, metrics: Mapping[str, float]) -> bool: ...

    def heartbeat(self, trial: Any, *, retry: RetryPolicy | None = None) -> bool: ...

    def tell(
        self,
        trial: Any,
        value: float | None = None,
        *,
        values: list[float] | None = None,
        state: str | None = None,
        error: str | None = None,
    ) -> Any: ...


class TrialPruned(Exception):
    """Raised by an objective to end its trial as pruned (Optuna's ``TrialPruned``)."""


class TrialHandle:
    """What :meth:`Study.optimize` hands the objective: params, number, and reporting.

    ``should_stop`` turns true when a report or the background heartbeat learns that the
    trial should stop (pruned, or its study stopped); it never turns back. The objective is
    not interrupted: it should check :meth:`should_prune` and return (or raise
    :class:`TrialPruned`). ``metric`` is the study's (first) objective metric: what a report
    in Optuna's order, ``report(value, step)``, reports.
    """

    # Whether a trial told to stop is told pruned even when its objective returned a value
    # (ours); Optuna's trial completes with the value it returned.
    pruned_when_stopped = True

    def __init__(self, study: TrialTeller, asked: Any, metric: str | None = None) -> None:
        self.study = study
        self._teller = study  # what reports go to (hpo.optuna's trial.study is another object)
        self.asked = asked  # reports, heartbeats and the tell go with its attempt's token
        self.trial_id = asked.trial_id
        self.number = asked.number
        self.params = asked.params
        self.metric = metric
        self.should_stop = False

    def report(self, step: Any, metrics: Any = None) -> bool:
        """Report ``metrics`` ({name: value}) at ``step``; True means stop now (pruned).

        Optuna's order, ``report(value, step)`` (a number, then an integer step), reports
        ``value`` as the study's objective metric; anything else is a TypeError."""
        step, metrics = report_arguments(step, metrics, self.metric)
        if self._teller.report(self.asked, step, metrics):
            self.should_stop = True
        return self.should_stop

    def should_prune(self) -> bool:
        """Whether the server said this trial should stop (a report or a heartbeat)."""
        return self.should_stop


class LeaseKeeper:
    """A background thread heartbeating one trial every ``interval_s`` while its objective
    runs (``with LeaseKeeper(...)``), so the server does not fail it for silence.

    A heartbeat answering should_stop sets ``handle.should_stop``; one refused because the
    trial has ended (409/404) sets it too and ends the thread. Other failures are logged and
    the next beat tries again. Leaving the block stops the thread.
    """

    def __init__(self, study: TrialTeller, handle: TrialHandle, interval_s: float) -> None:
        self.study = study
        self.handle = handle
        self.interval_s = interval_s
        # A beat retries for at most one interval: the next beat is as good as a late retry.
        self._retry = RetryPolicy(attempts=3, total_s=interval_s, first_wait_s=interval_s / 10)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"hpo-heartbeat-{handle.trial_id}", daemon=True
        )

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        # A beat in flight is not waited for long: once the trial is told, it ends the thread.
        self._thread.join(timeout=self.interval_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.study.heartbeat(self.handle.asked, retry=self._retry):
                    self.handle.should_stop = True
            except (errors.Conflict, errors.NotFound) as exc:
                log.info("trial %d ended on the server: %s", self.handle.number, exc)
                self.handle.should_stop = True
                return
            except Exception as exc:  # a background thread: log, and beat again later
                log.warning("heartbeat of trial %d failed: %s", self.handle.number, exc)


def report_arguments(
    step: Any, metrics: Any, metric: str | None
) -> tuple[int, Mapping[str, float]]:
    """``(step, {name: value})`` from ``report(step, metrics)`` or Optuna's ``report(value,
    step)``; TypeError saying which forms are accepted otherwise."""
    if isinstance(metrics, Mapping) and is_step(step):
        return int(step), metrics
    if is_step(metrics) and is_number(step) and metric is not None:
        return int(metrics), {metric: float(step)}
    raise TypeError(
        "report takes (step, {metric: value}) or, as Optuna, (value, step) with an integer "
        f"step; got ({step!r}, {metrics!r})"
    )


def is_step(x: Any) -> bool:
    """Whether ``x`` can be a report's step: an integer (not a bool; numpy's too), 0 or
    more."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0


def is_number(x: Any) -> bool:
    """Whether ``x`` can be a reported value: anything ``float()`` takes but a bool, a
    string or a mapping."""
    if isinstance(x, bool):
        return False
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return not isinstance(x, (str, bytes, Mapping))


def _describe(exc: BaseException) -> str:
    """The reason told for an objective that raised: its type and message."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _result_problem(result: object) -> str | None:
    """Why an objective's return value cannot be told as a result, or None when it can."""
    values = list(result) if isinstance(result, (list, tuple)) else [result]
    shown: list[float] = []
    for value in values:
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return f"objective returned {result!r}, not a number"
        shown.append(number)
    if all(math.isfinite(v) for v in shown):
        return None
    return f"objective returned {shown[0] if len(shown) == 1 else shown}"


def run_trial(
    study: TrialTeller,
    objective: Callable[[TrialHandle], float | list[float]],
    handle: TrialHandle,
    catch: tuple[type[BaseException], ...],
    interval_s: float,
) -> None:
    """Run ``objective`` for one asked trial under a heartbeat and tell its outcome: its
    value(s); ``pruned`` when the server said stop or it raised TrialPruned; or ``failed``
    with the reason (NaN, inf, None, not a number, as many values as the study has not
    objectives, or an exception: one in ``catch`` is logged, any other re-raised once the
    trial is told)."""
    try:
        with LeaseKeeper(study, handle, interval_s):
            result = objective(handle)
    except TrialPruned:
        _tell_or_log(study, handle, state="pruned")
        return
    except catch as exc:
        log.warning("trial %d failed; going on", handle.number, exc_info=True)
        _tell_or_log(study, handle, state="failed", error=_describe(exc))
        return
    except BaseException as exc:
        # Told before re-raising; a failing tell must not hide the objective's exception.
        try:
            _tell_or_log(study, handle, state="failed", error=_describe(exc))
        except Exception:
            log.exception("could not tell trial %d failed", handle.number)
        raise
    if handle.should_stop and handle.pruned_when_stopped:
        _tell_or_log(study, handle, state="pruned")
        return
    problem = _result_problem(result)
    if problem is not None:
        log.warning("trial %d failed: %s", handle.number, problem)
        _tell_or_log(study, handle, state="failed", error=problem)
    else:
        told = (
            {"values": [float(v) for v in result]}
            if isinstance(result, (list, tuple))
            else {"value": float(result)}
        )
        try:
            study.tell(handle.asked, **told)
        except errors.TrialFinished as exc:  # pruned at a report the objective did not heed
            log.warning(
                "trial %d returned %r, but the server had already ended it: %s",
                handle.number,
                result,
                exc,
            )
        except errors.InvalidInput as exc:  # 2 values for 1 objective: failed, as in Optuna
            log.warning("trial %d failed: %s", handle.number, exc.message)
            _tell_or_log(study, handle, state="failed", error=exc.message)


def _tell_or_log(study: TrialTeller, handle: TrialHandle, **outcome: Any) -> None:
    """Tell ``outcome``; a trial the server already ended (stopped study, pruned, lease
    lost) is logged, not raised."""
    try:
        study.tell(handle.asked, **outcome)
    except (errors.TrialFinished, errors.NotFound) as exc:
        log.info("trial %d was already ended by the server: %s", handle.number, exc)
