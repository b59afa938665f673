"""Live progress of a study on the terminal, shared by ``hpo submit --wait``, ``hpo watch``
and ``hpo demo``: a progress bar, one line per finished trial, then the best trial."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape

from hpo.api.retry import NO_RETRY, Outage
from hpo.service.errors import HpoError


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader left (``hpo best x | head -1``): the CLI ends as a shell reports
        SIGPIPE, 141 (rich's own answer is exit status 1, which says the study failed)."""
        self.quiet = True
        raise BrokenPipeError


# Piped or redirected output (logs, CI) is not cut at 80 columns: tables and trial lines whole.
# Messages to stderr are not broken into lines (an error naming a long path stays one line).
console = _Console(stderr=True, width=None if sys.stderr.isatty() else 200, soft_wrap=True)
# Study data (names, parameter values, errors) is printed literally on stdout: no rich markup,
# no colours put into numbers (a script reading `study 12 (name) created` finds 12)
out = _Console(width=None if sys.stdout.isatty() else 200, markup=False, highlight=False)

# How long ``watch`` waits, after a dispatched study ends, for its best trial's test metrics.
TEST_METRICS_WAIT_S = 300.0

# How long ``watch`` goes on while the server cannot be reached or answers 503 (a restart, a
# database outage: the study goes on meanwhile) before it gives up with the error.
GIVE_UP_AFTER_S = 300.0


# A trial in one of these states has started: its study's trials do get launched.
STARTED = ("running", "paused", "complete", "pruned", "failed")


class _SchedulerCheck:
    """Warns when a study with a trainable waits for something that will not come by itself:
    once when no server of its database runs the scheduler (every ``hpo serve`` started with
    ``--no-scheduler``), said only after ``grace_s`` without one (a server that has just
    started takes it at once); once when the scheduler's server cannot start or reach Ray
    (``/healthz``'s ``executor_failure``); and once when the cluster's node preflight failed.
    Looked at until a trial of the study has started."""

    def __init__(self, study: Any, record: Any, grace_s: float = 5.0) -> None:
        self.study = study
        self.pending = bool(record.spec.get("trainable"))
        self.since = time.monotonic()
        self.grace_s = grace_s
        self.said: set[str] = set()

    def check(self, shown: Any, record: Any) -> None:
        if not self.pending:
            return
        # once a trial has started, this is the last look (a failed preflight is said even
        # then: the trials on a failed node may not run or report)
        self.pending = not any(record.counts.get(state) for state in STARTED)
        try:
            health = self.study.client.health(retry=NO_RETRY)  # the loop waits for no retries
        except HpoError as exc:  # a 503: an outage (look again later), or a failed preflight
            if "preflight failed" in exc.message:
                self._say(shown, "preflight", f"{exc.message} (hpo doctor tells more)")
            return
        waited = time.monotonic() - self.since >= self.grace_s
        if not health.get("scheduler_running", True) and waited:
            self._say(
                shown,
                "scheduler",
                f"no hpo serve of this database has run the scheduler for {self.grace_s:g} s "
                "(each was started with --no-scheduler or HPO_SCHEDULER=false, or the "
                "scheduler's server stopped): the trials of this study, which has a "
                "trainable, will not start until one does",
            )
        failure = health.get("executor_failure")
        if failure:
            self._say(
                shown,
                "executor",
                f"the scheduler's server cannot start or reach Ray ({failure.get('tries')} "
                f"tries since {failure.get('since')}; it tries again, waiting up to "
                f"{failure.get('next_try_in_s')} s): {failure.get('error')}. The trials of "
                "this study will not start until it can (its log and /healthz tell more)",
            )

    def _say(self, shown: Any, what: str, text: str) -> None:
        if what not in self.said:
            self.said.add(what)
            _warn(shown, text)


def watch(
    study: Any,
    poll_s: float = 1.0,
    *,
    report: bool = True,
    give_up_after_s: float = GIVE_UP_AFTER_S,
) -> int:
    """Show a live progress bar (trials by state, best so far) until the study ends; then,
    with ``report``, the best trial and its test metrics. Returns the exit code: 0 when the
    study completed with a complete trial, else 1. While the server cannot be reached or
    cannot serve (it restarts, its database is away), it says so once and goes on looking;
    the error propagates once that lasted ``give_up_after_s``, and at once for any other."""
    from rich.live import Live
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    outage = Outage(give_up_after_s)
    record = _answered(study.refresh, outage, console, poll_s)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),  # "4/?" without max_trials
        TextColumn("{task.fields[states]}"),
        TextColumn("best {task.fields[best]}"),
        TimeElapsedColumn(),
        console=console,
    )
    budget = record.spec["budget"].get("max_trials")
    task = progress.add_task(escape(record.name), total=budget, states="", best="-")
    try:
        with Live(progress, console=console, refresh_per_second=4):
            record = _follow(study, record, progress, task, poll_s, outage)
    finally:  # an error too goes on a line of its own, not after the bar
        if not console.is_terminal:
            console.line()  # a terminal's Live ends its last frame with a newline; a pipe's not
    out.print(f"study {record.id} {record.state}: {record.state_reason or ''}")
    best = record.best_trial
    if best and report:
        out.print(f"best value {best.value} with {best.params}", soft_wrap=True)
        if record.state == "completed" and record.spec.get("trainable"):
            print_test_metrics(wait_for_test_metrics(study, best))
    ok = record.state == "completed" and record.counts["complete"] > 0
    return 0 if ok else 1


def _answered(call: Callable[[], Any], outage: Outage, shown: Any, poll_s: float) -> Any:
    """``call()``'s result once the server answers it (an outage said and waited out)."""
    while True:
        try:
            result = call()
        except Exception as exc:
            _warn(shown, outage.failed(exc))
            time.sleep(poll_s)
            continue
        back = outage.answered()
        if back:
            shown.print(escape(back), soft_wrap=True)
        return result


def _follow(
    study: Any, record: Any, progress: Any, task: Any, poll_s: float, outage: Outage
) -> Any:
    """Move the bar and print each trial as it ends, until the study ends; its last record.
    An outage of the server is said and waited out (see :func:`watch`)."""
    cursor, reported = None, set()
    scheduled = _SchedulerCheck(study, record)
    shown = progress.console
    if not record.spec.get("trainable"):
        _note(
            shown,
            f"study {record.name} has no trainable: its trials come from ask/tell clients "
            "(the Python client, the REST API); this watch ends when its budget is spent or "
            "it is stopped",
        )
    paused_said = False

    def look() -> Any:
        nonlocal cursor, paused_said
        if record.state == "paused" and not paused_said:
            _note(
                shown,
                f"study {record.name} is paused: no trial of it starts until `hpo resume "
                f"{record.name}`",
            )
        paused_said = record.state == "paused"
        scheduled.check(shown, record)
        changed, cursor = study.changed_trials(cursor)
        for t in sorted(changed, key=lambda t: t.number):
            if t.state in ("complete", "pruned", "failed") and t.id not in reported:
                reported.add(t.id)
                shown.print(trial_line(t), soft_wrap=True)
        return study.refresh()

    while True:
        record = _answered(look, outage, shown, poll_s)
        progress.update(task, **_progress_fields(record))
        if record.state in ("completed", "stopped"):
            return record
        time.sleep(poll_s)


def _note(shown: Any, text: str) -> None:
    shown.print(f"[cyan]note:[/cyan] {escape(text)}", soft_wrap=True)


def _warn(shown: Any, text: str | None) -> None:
    if text:
        shown.print(f"[yellow]warning:[/yellow] {escape(text)}", soft_wrap=True)


def _progress_fields(record: Any) -> dict[str, Any]:
    c = record.counts
    states = (
        f"running {c['running']} · waiting {c['waiting']} · paused {c.get('paused', 0)}"
        f" · complete {c['complete']}"
        f" · pruned {c['pruned']} · failed {c['failed']}"
    )
    best = fmt(record.best_trial.value) if record.best_trial else "-"
    return {"completed": c["complete"] + c["pruned"] + c["failed"], "states": states, "best": best}


def wait_for_test_metrics(study: Any, best: Any) -> dict[str, Any] | None:
    """The best trial's held-out test metrics, or None.

    The scheduler scores a completed study's best trial on the test split once, just after
    the study ends; this waits for that (at most :data:`TEST_METRICS_WAIT_S`) rather than
    answer without it. Trials without a checkpoint, and multi-objective ones, are not scored."""
    if best.values is not None or not best.has_checkpoint:
        return best.test_metrics
    deadline = time.monotonic() + TEST_METRICS_WAIT_S
    with console.status("scoring the best trial on the test split"):
        while best.test_metrics is None and time.monotonic() < deadline:
            time.sleep(1.0)
            best = study.best_trial
    return best.test_metrics


def print_test_metrics(test: dict[str, Any] | None) -> None:
    """One line with the test metrics (or why their evaluation failed); nothing for None."""
    if test and "error" in test:
        out.print(f"  test metrics: evaluation failed: {test['error']}")
    elif test:
        shown = ", ".join(f"{k}={fmt(v)}" for k, v in test.items())
        out.print(f"  test metrics: {shown}", soft_wrap=True)


def trial_line(t: Any) -> str:
    """A finished trial as one coloured line: number, state, value(s), params, and why it
    stopped early or failed."""
    colour = {"complete": "green", "pruned": "yellow", "failed": "red"}[t.state]
    value = fmt(t.value) if t.values is None else ", ".join(fmt(v) for v in t.values)
    params = escape(" ".join(f"{k}={fmt(v)}" for k, v in t.params.items()))
    line = f"  trial {t.number:>3} [{colour}]{t.state:<8}[/{colour}] value={value:<10} {params}"
    if t.state == "pruned" and t.pruned:
        line += f"  (stopped at step {t.pruned.get('step')})"
    if t.state == "failed" and t.error:
        line += f"  ({escape(t.error.splitlines()[0][:80])})"
    return line


def fmt(value: Any) -> str:
    """A value for a table cell: ``-`` for None, floats to 6 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
