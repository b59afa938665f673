"""The ``hpo`` command line: serve the control plane, submit and watch studies, read results.

Exit codes: 0 success, 1 the study failed or was stopped (``doctor``: a check failed), 2 bad
input (spec, arguments), 3 the server refused the request (unknown id, conflict), 4 the server
could not be reached.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from hpo.api.progress import GIVE_UP_AFTER_S, console, fmt, out, print_test_metrics, watch
from hpo.service import errors
from hpo.service.records import Lineage, TrialRecord
from hpo.service.spec import StudySpec, describe_errors


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (ValidationError, ValueError) as exc:
        _print_invalid(exc)
        return 3 if _answer_problem(exc) else 2
    except errors.InvalidInput as exc:
        _error(exc.message)
        return 2
    except errors.HpoError as exc:
        _error(exc.message)
        return 3
    except httpx.TransportError as exc:
        from hpo.api.client import server_url

        where = server_url(getattr(args, "url", None))
        _error(
            f"cannot reach the hpo server at {where}: {exc} (is `hpo serve` running there? "
            "--url or $HPO_URL name another)"
        )
        return 4
    except BrokenPipeError:  # `hpo trials x | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141  # as a shell reports a command ended by SIGPIPE
    except OSError as exc:  # a file or folder named on the command line or in HPO_*
        _error(exc)
        return 2
    except KeyboardInterrupt:
        return 130


# What a study loaded by `hpo submit --load-if-exists` that is not running needs to run.
_NOT_RUNNING = {
    "paused": "no trial of it starts until `hpo resume {name}`",
    "completed": "raise its budget to run more (Study.continue_, or PATCH its budget)",
    "stopped": "a stopped study takes no more trials",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpo", description="Distributed hyperparameter search.")
    sub = p.add_subparsers(metavar="COMMAND")

    def client_cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--url", help="server URL (default: $HPO_URL or http://127.0.0.1:8000)")
        c.add_argument("--token", help="API token (default: $HPO_TOKEN or the local token file)")
        return c

    s = sub.add_parser("serve", help="run the control plane (API, scheduler, dashboard)")
    s.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default 8000)")
    s.add_argument("--database-url", default=None, help="overrides $HPO_DATABASE_URL")
    s.add_argument("--data-dir", default=None, help="overrides $HPO_DATA_DIR")
    s.add_argument("--no-scheduler", action="store_true", help="serve ask/tell only")
    s.add_argument(
        "--workers", type=int, default=None, help="server processes on the port ($HPO_WORKERS, 1)"
    )
    s.set_defaults(func=cmd_serve)

    c = client_cmd("submit", "create a study from a YAML spec")
    c.add_argument("spec", type=Path)
    c.add_argument("--wait", action="store_true", help="show live progress until it ends")
    c.add_argument("--load-if-exists", action="store_true", help="reuse a study of that name")
    _give_up_after(c)
    c.set_defaults(func=cmd_submit)

    c = client_cmd("studies", "list studies")
    c.add_argument("--state", choices=["running", "paused", "stopped", "completed"])
    c.set_defaults(func=cmd_studies)

    c = client_cmd("trials", "list the trials of a study")
    c.add_argument("study", help="study id or name")
    c.add_argument("--state", help="only these states (comma separated)")
    c.set_defaults(func=cmd_trials)

    c = client_cmd("best", "show the best trial of a study")
    c.add_argument("study")
    c.set_defaults(func=cmd_best)

    c = client_cmd("replay", "train again along a trial's schedule (a PBT study's result)")
    c.add_argument("study")
    c.add_argument("--trial", type=int, metavar="NUMBER", help="trial number (default: the best)")
    c.add_argument("--trials", type=int, default=1, help="how many trials train it (default 1)")
    c.add_argument("--name", help="the new study's name (default: <study>-replay-<number>)")
    c.add_argument("--print", action="store_true", help="print the spec as YAML, create nothing")
    c.add_argument("--wait", action="store_true", help="show live progress until it ends")
    _give_up_after(c)
    c.set_defaults(func=cmd_replay)

    c = client_cmd("export", "export a study's trials (CSV, TensorBoard or MLflow)")
    c.add_argument("study")
    to = c.add_mutually_exclusive_group(required=True)
    to.add_argument("--csv", action="store_true", help="as CSV")
    to.add_argument(
        "--tensorboard", type=Path, metavar="DIR", help="a TensorBoard run per trial under DIR"
    )
    to.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        metavar="URI",
        help="an MLflow run per trial, to a tracking URI or a folder "
        "(default: $MLFLOW_TRACKING_URI or ./mlruns, a local file store)",
    )
    c.add_argument("--experiment", help="MLflow experiment (default: the study's name)")
    c.add_argument("-o", "--output", type=Path, help="CSV file to write (default: stdout)")
    c.set_defaults(func=cmd_export)

    c = client_cmd("watch", "show live progress of a study until it ends")
    c.add_argument("study")
    _give_up_after(c)
    c.set_defaults(func=cmd_watch)

    for name, state in (("pause", "paused"), ("resume", "running"), ("stop", "stopped")):
        c = client_cmd(name, f"{name} a study")
        c.add_argument("study")
        c.set_defaults(func=cmd_set_state, state=state)

    c = client_cmd("delete", "delete a study and all its data")
    c.add_argument("study")
    c.set_defaults(func=cmd_delete)

    t = sub.add_parser("token", help="print the API token ($HPO_TOKEN or hpo serve's token file)")
    t.add_argument("--data-dir", default=None, help="overrides $HPO_DATA_DIR")
    t.set_defaults(func=cmd_token)

    d = sub.add_parser(
        "doctor",
        help="check this deployment: database, Ray, checkpoint storage, public URL, a server",
    )
    d.add_argument(
        "--url", help="also check this running server's /healthz and its nodes (default: $HPO_URL)"
    )
    d.add_argument("--timeout", type=_timeout, default=10.0, help="seconds per network check")
    d.set_defaults(func=cmd_doctor)

    d = sub.add_parser("demo", help="start a server and run a small demo study end to end")
    d.add_argument("--trials", type=int, default=None, help="override the demo's max_trials")
    d.add_argument(
        "--ask-tell", action="store_true", help="run trials in this process over ask/tell"
    )
    d.add_argument("--keep", action="store_true", help="keep serving after the demo ends")
    d.set_defaults(func=cmd_demo)
    return p


def _client(args: argparse.Namespace) -> Any:
    from hpo.api.client import Client

    return Client(args.url, args.token)


# ------------------------------------------------------------------ commands


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from hpo.api import serving
    from hpo.service.settings import Settings

    overrides: dict[str, Any] = {}
    for key in ("host", "port", "database_url", "data_dir", "workers"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.no_scheduler:
        overrides["scheduler"] = False
    settings = Settings(**overrides)
    serving.configure_logging(settings.log_level)
    problem = _database_problem(settings)
    if problem:
        _error(f"cannot use the database {_safe(settings)}: {problem}")
        return 2
    problem = _address_problem(settings.host, settings.port)
    if problem:
        _error(f"cannot serve on {settings.host}:{settings.port}: {problem}")
        return 2
    token = settings.api_token(create=True)
    url = f"http://{settings.host}:{settings.port}"
    console.print(f"hpo serving on [bold]{url}[/bold] (database: {escape(_safe(settings))})")
    if token:
        console.print(f"dashboard: {url}/#token={token}")
        console.print(f"API token: {token} (also in {settings.token_file})", markup=False)
    if settings.workers > 1:
        # the workers read their settings as this process did, the options included
        options = {f"HPO_{key.upper()}": _env_value(v) for key, v in overrides.items()}
        env = {**os.environ, **options}
        console.print(f"{settings.workers} server processes")
        return serving.supervise(settings, env, settings.workers)
    from hpo.api.app import create_app  # the workers' own business under --workers

    uvicorn.run(
        create_app(settings, freeze_heap=True),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
    )
    return 0


def _env_value(value: Any) -> str:
    """A setting as its ``HPO_*`` variable spells it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _seconds(text: str) -> float:
    """A finite number of seconds, 0 or more (argparse's type: exit 2 naming the option)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _timeout(text: str) -> float:
    """A finite number of seconds above 0 (argparse's type: exit 2 naming the option)."""
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is no time to wait (more than 0 seconds)")
    return value


def _give_up_after(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--give-up-after",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="while watching, how long to wait for a server that stopped answering (it "
        "restarts, its database is away) before exiting with its error "
        f"(default {GIVE_UP_AFTER_S:g})",
    )


def _give_up_s(args: argparse.Namespace) -> float:
    return GIVE_UP_AFTER_S if args.give_up_after is None else args.give_up_after


def cmd_submit(args: argparse.Namespace) -> int:
    if args.give_up_after is not None and not args.wait:
        raise errors.InvalidInput("--give-up-after: only with --wait (it is how long to watch)")
    if not args.spec.exists():
        raise errors.InvalidInput(f"spec file {args.spec} does not exist")
    spec = StudySpec.from_yaml(args.spec)
    client = _client(args)
    with warnings.catch_warnings():  # what a loaded study keeps is said below
        warnings.filterwarnings("ignore", message=r"study .* loaded: it keeps")
        try:
            study = client.create_study(spec, load_if_exists=args.load_if_exists)
        except errors.NameTaken as exc:
            raise errors.NameTaken(
                f"{exc.message}: --load-if-exists loads it (when its objective and space are "
                "the file's), or give the file another name",
                field="name",
            ) from None
    if study.created:
        out.print(f"study {study.id} ({study.name}) created")
    else:
        kept = ", ".join(study.kept)
        kept = f"; it keeps its stored {kept}, not the file's" if kept else ""
        out.print(
            f"study {study.id} ({study.name}) loaded: it existed with the same objective and "
            f"space, and runs on its stored spec{kept} (a budget changes with PATCH "
            "/api/v1/studies/{id} or Study.set_budget)"
        )
        state = study.state
        if state != "running":
            out.print(f"it is {state}: {_NOT_RUNNING[state].format(name=study.name)}")
    if args.wait:
        return watch(study, give_up_after_s=_give_up_s(args))
    if spec.trainable is not None and _scheduler_running(client) is False:
        console.print(  # `watch` says it after a grace; nothing would say it here
            "[yellow]note:[/yellow] no hpo serve of this database runs the scheduler now "
            "(each was started with --no-scheduler or HPO_SCHEDULER=false, or it stopped): the "
            "trials of this study, which has a trainable, will not start until one does"
        )
    return 0


def _scheduler_running(client: Any) -> bool | None:
    """Whether a server of the database runs the scheduler, by one look at ``/healthz``;
    None when it does not say (a 503: an outage, a failed preflight; no answer)."""
    from hpo.api.retry import NO_RETRY

    try:
        return client.health(retry=NO_RETRY).get("scheduler_running")
    except (errors.HpoError, httpx.HTTPError):
        return None


def cmd_replay(args: argparse.Namespace) -> int:
    if args.give_up_after is not None and not args.wait:
        raise errors.InvalidInput("--give-up-after: only with --wait (it is how long to watch)")
    if args.trials < 1:
        raise errors.InvalidInput(f"--trials: at least 1, got {args.trials}", field="trials")
    client = _client(args)
    study = client.study(args.study)
    if args.trial is None:
        trial = study.best_trial
        if trial is None:
            console.print(f"study {study.id} has no complete trial yet")
            return 1
    else:
        trial = next((t for t in study.trials() if t.number == args.trial), None)
        if trial is None:
            raise errors.InvalidInput(
                f"--trial: study {study.id} has no trial number {args.trial}", field="trial"
            )
    spec = study.replay_spec(trial, trials=args.trials, name=args.name)
    if args.print:
        yaml.safe_dump(spec.model_dump(mode="json"), sys.stdout, sort_keys=False)
        return 0
    replayed = client.create_study(spec)
    segments = len(spec.replay.schedule) if spec.replay else 0
    out.print(
        f"study {replayed.id} ({replayed.name}) created: replays trial {trial.number} of study "
        f"{study.id} along {segments} segment(s)"
    )
    if args.wait:
        return watch(replayed, give_up_after_s=_give_up_s(args))
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    table = Table("id", "name", "state", "sampler", "done", "running", "failed", "budget", "best")
    for s in _client(args).studies(state=args.state):
        c = s.counts
        best = s.best_trial.value if s.best_trial else None
        table.add_row(
            str(s.id),
            s.name,
            s.state,
            s.spec["sampler"]["type"],
            str(c["complete"] + c["pruned"]),
            str(c["running"]),
            str(c["failed"]),
            str(s.spec["budget"].get("max_trials") or "-"),
            fmt(best),
        )
    out.print(table)
    return 0


def cmd_trials(args: argparse.Namespace) -> int:
    study = _client(args).study(args.study)
    trials = study.trials(state=args.state)
    names: list[str] = []
    for t in trials:
        names.extend(n for n in t.params if n not in names)
    table = Table("#", "id", "state", "value", *names, "attempts", "duration_s")
    for t in trials:
        value = t.value if t.values is None else ", ".join(fmt(v) for v in t.values)
        table.add_row(
            str(t.number),
            str(t.id),
            t.state,
            fmt(value),
            *(fmt(t.params.get(n)) for n in names),
            str(t.attempts),
            fmt(t.duration_s),
        )
    out.print(table)
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    study = _client(args).study(args.study)
    front = study.best_trials
    if not front:
        console.print(f"study {study.id} has no complete trial yet")
        return 1
    for t in front:
        value = t.value if t.values is None else t.values
        out.print(f"trial {t.number} (id {t.id}): value {value}")
        for k, v in t.params.items():
            out.print(f"  {k} = {v}")
        for line in schedule_lines(t):
            out.print(line)
        if len(t.schedule or []) > 1:  # it copied or resumed: what replays it
            for line in lineage_lines(study.lineage(t), study.id):
                out.print(line)
        print_test_metrics(t.test_metrics)
    return 0


def lineage_lines(lineage: Lineage, study_id: int) -> list[str]:
    """A copying trial's lineage: what a fresh trial trains to reproduce it (``hpo replay``)."""
    lines = [f"  lineage (hpo replay {study_id} --trial {lineage.number} trains it again):"]
    for segment in lineage.schedule:
        params = ", ".join(f"{k}={v}" for k, v in segment.params.items())
        lines.append(f"    from step {segment.step}: {params}  (trial {segment.trial_number})")
    lines += [f"    note: {problem}" for problem in lineage.problems]
    return lines


def schedule_lines(trial: TrialRecord) -> list[str]:
    """A PBT (or replay) trial's parameters over its steps, each segment with the trial it
    copied or the resume of its own checkpoint (none for a trial that never resumed one): the
    result of a PBT study is this schedule, not one set of parameters."""
    if not trial.schedule:
        return []
    lines = ["  schedule:"]
    for segment in trial.schedule:
        params = ", ".join(f"{k}={v}" for k, v in segment.params.items())
        copied = ""
        if segment.parent is not None:
            how = ", ".join(f"{k} {v}" for k, v in segment.perturbed.items())
            copied = f"  (copied trial {segment.parent.number} at step {segment.parent.step}"
            copied += f"; {how})" if how else ")"
        elif segment.step > 0:
            copied = "  (resumed its own checkpoint)"
        lines.append(f"    from step {segment.step}: {params}{copied}")
    return lines


def cmd_export(args: argparse.Namespace) -> int:
    study = _client(args).study(args.study)
    if not args.csv:
        return _export_runs(args, study)
    text = study.export_csv()
    if args.output:
        args.output.write_text(text)
        console.print(f"wrote {args.output}", markup=False)
    else:
        sys.stdout.write(text)
    return 0


def _export_runs(args: argparse.Namespace, study: Any) -> int:
    from hpo.api.integrations import export

    try:
        runs = export.study_runs(study)
        if args.tensorboard is not None:
            export.write_tensorboard(runs, args.tensorboard)
            console.print(f"wrote {len(runs)} runs to {args.tensorboard}", markup=False)
            console.print(f"view them: tensorboard --logdir {args.tensorboard}", markup=False)
        else:
            uri = export.mlflow_uri(args.mlflow)
            export.write_mlflow(runs, uri, args.experiment or study.name)
            console.print(
                f"wrote {len(runs)} runs to {uri}, experiment {args.experiment or study.name!r}",
                markup=False,
            )
    except ImportError as exc:
        _error(exc)
        return 2
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    return watch(_client(args).study(args.study), give_up_after_s=_give_up_s(args))


def cmd_set_state(args: argparse.Namespace) -> int:
    study = _client(args).study(args.study)
    record = {"paused": study.pause, "running": study.resume, "stopped": study.stop}[args.state]()
    out.print(f"study {record.id} is {record.state}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    study = _client(args).study(args.study)
    study.delete()
    out.print(f"study {study.id} deleted")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print the API token (``export HPO_TOKEN=$(hpo token)``): 2 when there is none."""
    from hpo.service.settings import Settings

    overrides = {"data_dir": Path(args.data_dir)} if args.data_dir else {}
    settings = Settings(**overrides)
    if not settings.auth:
        _error("auth is off (HPO_AUTH=false): the API takes no token")
        return 2
    token = settings.api_token()
    if not token:
        _error(
            f"no API token: $HPO_TOKEN is unset and {settings.token_file} does not exist "
            "(`hpo serve` writes it at its first start; set $HPO_DATA_DIR or --data-dir to the "
            "server's data directory)"
        )
        return 2
    print(token)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """One line per check (ok, or FAIL with what is wrong and what to do); exit 0 only when
    every check passed, 1 otherwise."""
    from hpo.api.doctor import run_checks
    from hpo.service.settings import Settings

    checks = run_checks(Settings(), args.url or os.environ.get("HPO_URL"), args.timeout)
    for check in checks:
        out.print(check.line(), markup=False, highlight=False, soft_wrap=True)
    failed = [c for c in checks if not c.ok]
    out.print(f"{len(failed)} of {len(checks)} checks failed" if failed else "all checks passed")
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hpo.api.demo import run_demo

    return run_demo(trials=args.trials, ask_tell=args.ask_tell, keep=args.keep)


# ------------------------------------------------------------------ helpers


def _error(message: object) -> None:
    """``error: message`` on stderr, the message printed as it is (no rich markup: a path
    or a value may hold brackets)."""
    console.print("[red]error:[/red]", escape(str(message)))


def _answer_problem(exc: Exception) -> bool:
    """Whether ``exc`` is a server's answer that does not read as the record it should be
    (not the user's input: a spec, the settings)."""
    return isinstance(exc, ValidationError) and exc.title not in ("StudySpec", "Settings")


def _print_invalid(exc: Exception) -> None:
    if isinstance(exc, ValidationError) and exc.title == "Settings":
        console.print("[red]invalid settings:[/red]")
        for item in describe_errors(exc):
            console.print(f"  HPO_{item['field'].upper()}: {item['message']}", markup=False)
    elif _answer_problem(exc):
        # an answer of the server that does not read as the record it should be
        first = describe_errors(exc)[0]
        _error(
            f"the server's answer does not read as a {exc.title} ({first['field']}: "
            f"{first['message']}): is the URL an hpo server's of this version?"
        )
    elif isinstance(exc, ValidationError):
        console.print("[red]invalid study spec:[/red]")
        for item in describe_errors(exc):
            console.print(f"  {item['field']}: {item['message']}", markup=False)
    else:
        _error(exc)


def _database_problem(settings: Any) -> str | None:
    """Why the configured database cannot be used, or None."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from hpo.service.db import make_engine
    from hpo.service.db.engine import schema_problem, write_problem

    try:
        engine = make_engine(settings.resolved_database_url)
        if engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:"):
            # each connection would get an empty database of its own
            return "an in-memory SQLite database is not shared by the server's connections"
        try:
            # it connects: an unreachable database raises here
            return schema_problem(engine) or write_problem(engine)
        finally:
            engine.dispose()
    except (SQLAlchemyError, ArgumentError, ImportError, ValueError) as exc:
        return str(exc).strip().splitlines()[0]


def _address_problem(host: str, port: int) -> str | None:
    """Why ``hpo serve`` could not listen on ``host:port`` (in use, no such address), or
    None: found before it says it serves (uvicorn would say so after, and exit 3)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as exc:  # socket.gaierror too
        return exc.strerror or str(exc)
    return None


def _safe(settings: Any) -> str:
    """The database URL without its password (not repeated when it is no URL at all: it
    might hold one)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(settings.resolved_database_url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(the URL given)"


if __name__ == "__main__":
    sys.exit(main())
