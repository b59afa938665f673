"""The ``hpo`` command line as a user runs it: a subprocess talking to a served control plane.

Exit codes: 0 success, 1 the study failed or was stopped, 2 bad input, 3 the server refused
the request, 4 the server could not be reached.
"""

from __future__ import annotations

import csv
import io
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from hpo.api.demo import free_port
from hpo.service.db import make_engine, upgrade_schema
from tests.conftest import ServerProcess, simple_spec, wait_for


def run_cli(
    server: ServerProcess | None, *args: str, url: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(server, *args, url=url),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
    )


def cli_command(server: ServerProcess | None, *args: str, url: str | None = None) -> list[str]:
    url = url or server.url
    token = server.token if server else "some-token"
    return [sys.executable, "-m", "hpo.api.cli", *args, "--url", url, "--token", token]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HPO_URL", "HPO_TOKEN")}
    env["COLUMNS"] = "200"  # rich tables: no truncated cells
    return env


def watch_output(server: ServerProcess, study: str, until: str, timeout: float = 60) -> str:
    """What ``hpo watch <study>`` printed once it printed ``until`` (or ``timeout`` passed,
    or it ended); then it is killed. Its lines are read in a thread: a watch that prints
    nothing cannot hold the test past ``timeout``."""
    watching = subprocess.Popen(
        cli_command(server, "watch", study),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
    )
    lines: queue.Queue[str] = queue.Queue()
    assert watching.stdout is not None
    threading.Thread(target=lambda: [lines.put(x) for x in watching.stdout], daemon=True).start()
    seen, deadline = "", time.monotonic() + timeout
    try:
        while until not in seen and (left := deadline - time.monotonic()) > 0:
            try:
                seen += lines.get(timeout=left)
            except queue.Empty:
                break
    finally:
        watching.kill()
        watching.wait(timeout=10)
    return seen


def write_spec(path: Path, name: str, **over: object) -> Path:
    path.write_text(yaml.safe_dump(simple_spec(name, **over), sort_keys=False))
    return path


def wait_for_study(server: ServerProcess, name: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    with server.http() as http:
        while time.monotonic() < deadline:
            found = http.get("/api/v1/studies", params={"name": name}).json()["studies"]
            if found:
                return found[0]["id"]
            time.sleep(0.1)
    raise AssertionError(f"study {name!r} was never created")


def test_submit_and_read_commands(sqlite_server: ServerProcess, tmp_path: Path) -> None:
    server = sqlite_server
    spec = write_spec(tmp_path / "study.yaml", "cli-study")
    r = run_cli(server, "submit", str(spec))
    assert r.returncode == 0, r.stderr
    with server.http() as http:
        [study] = http.get("/api/v1/studies").json()["studies"]
    assert study["name"] == "cli-study"
    assert f"study {study['id']} (cli-study) created" in r.stdout
    sid = study["id"]
    r = run_cli(server, "submit", str(spec), "--load-if-exists")
    assert r.returncode == 0, r.stderr
    assert f"study {sid} (cli-study) loaded: it existed with the same objective" in r.stdout
    assert "it keeps" not in r.stdout, r.stdout  # nothing the file says otherwise
    # what is kept is said only when the file says otherwise
    budget = write_spec(tmp_path / "more.yaml", "cli-study", budget={"max_trials": 40})
    r = run_cli(server, "submit", str(budget), "--load-if-exists")
    assert r.returncode == 0, r.stderr
    assert "it keeps its stored budget, not the file's" in r.stdout, r.stdout
    assert "sampler" not in r.stdout and "pruner" not in r.stdout
    other = {"max_retries": 7, "lease_s": 999, "resources": {"workers_per_trial": 3}}
    changed = write_spec(tmp_path / "other.yaml", "cli-study", description="new", **other)
    r = run_cli(server, "submit", str(changed), "--load-if-exists")
    assert r.returncode == 0, r.stderr
    kept = "it keeps its stored description, resources, max_retries, lease_s, not the file's"
    assert kept in r.stdout, r.stdout

    r = run_cli(server, "best", "cli-study")
    assert r.returncode == 1 and "no complete trial" in r.stderr
    r = run_cli(server, "replay", "cli-study")
    assert r.returncode == 1 and "no complete trial" in r.stderr

    with server.client() as client:
        s = client.study(sid)
        told = {}
        for value in (0.75, 0.25, 0.5):
            t = s.ask()
            s.tell(t, value=value)
            told[t.trial_id] = (value, t.params)
        running = s.ask()
    best_id = min(told, key=lambda k: told[k][0])

    r = run_cli(server, "studies")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if "cli-study" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[:6] == [str(sid), "cli-study", "running", "random", "3", "1"]
    assert cells[-1] == "0.25"

    for ref in (str(sid), "cli-study"):
        r = run_cli(server, "trials", ref)
        assert r.returncode == 0, r.stderr
        lines = [line for line in r.stdout.splitlines() if line.startswith("│")]
        rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in lines]
        ids = [*told, running.trial_id]
        assert [(row[0], row[1], row[2]) for row in rows] == [
            ("0", str(ids[0]), "complete"),
            ("1", str(ids[1]), "complete"),
            ("2", str(ids[2]), "complete"),
            ("3", str(ids[3]), "running"),
        ]
        assert [row[3] for row in rows] == ["0.75", "0.25", "0.5", "-"]

    r = run_cli(server, "trials", "cli-study", "--state", "running")
    assert r.returncode == 0 and str(running.trial_id) in r.stdout
    assert "complete" not in r.stdout

    r = run_cli(server, "best", "cli-study")
    assert r.returncode == 0, r.stderr
    assert f"trial 1 (id {best_id}): value 0.25" in r.stdout
    assert f"x = {told[best_id][1]['x']}" in r.stdout
    assert "lineage" not in r.stdout  # it copied nothing

    # hpo replay: bad input exits 2 naming what is wrong, and creates nothing
    for args, says in (
        (["--trial", "9"], "--trial: study"),
        (["--trials", "0"], "--trials: at least 1"),
        (["--give-up-after", "5"], "only with --wait"),
        ([], "scheduler.type: replay resumes trials from their checkpoints"),  # ask/tell
    ):
        r = run_cli(server, "replay", "cli-study", *args)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr)
    with server.http() as http:
        assert len(http.get("/api/v1/studies").json()["studies"]) == 1

    r = run_cli(server, "export", "cli-study", "--csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert list(rows[0])[:4] == ["number", "trial_id", "state", "value"]
    assert {"params_x", "params_n"} <= set(rows[0])
    assert [row["state"] for row in rows] == ["complete"] * 3 + ["running"]
    assert [row["value"] for row in rows] == ["0.75", "0.25", "0.5", ""]

    out_file = tmp_path / "out" / "trials.csv"
    out_file.parent.mkdir()
    r = run_cli(server, "export", str(sid), "--csv", "-o", str(out_file))
    assert r.returncode == 0, r.stderr
    from_file = list(csv.DictReader(io.StringIO(out_file.read_text())))
    for row in (*rows, *from_file):
        row.pop("duration_s")  # the running trial ages between the two exports
    assert from_file == rows
    assert r.stdout == ""

    with server.http() as http:

        def state() -> str:
            return http.get(f"/api/v1/studies/{sid}").json()["state"]

        for command, expected in (("pause", "paused"), ("resume", "running"), ("stop", "stopped")):
            r = run_cli(server, command, "cli-study")
            assert r.returncode == 0, r.stderr
            assert f"study {sid} is {expected}" in r.stdout
            assert state() == expected
        r = run_cli(server, "resume", "cli-study")
        assert r.returncode == 3 and "stopped" in r.stderr
        assert state() == "stopped"


def test_bad_input_and_unreachable_server(sqlite_server: ServerProcess, tmp_path: Path) -> None:
    server = sqlite_server
    bad = write_spec(
        tmp_path / "bad.yaml", "bad", space={"lr": {"type": "float", "low": 1.0, "high": 0.1}}
    )
    r = run_cli(server, "submit", str(bad))
    assert r.returncode == 2
    assert "space.lr" in r.stderr and "greater than" in r.stderr
    assert "Traceback" not in r.stderr

    typo = tmp_path / "typo.yaml"
    typo.write_text(
        "name: typo\nobjective: {metric: loss}\nspace:\n  lr: {type: float, low: 0.1, hihg: 1}\n"
    )
    r = run_cli(server, "submit", str(typo))
    assert r.returncode == 2 and "space.lr.hihg" in r.stderr

    r = run_cli(server, "submit", str(tmp_path / "missing.yaml"))
    assert r.returncode != 0
    assert "missing.yaml" in r.stderr and "does not exist" in r.stderr

    grid = write_spec(
        tmp_path / "grid.yaml",
        "grid",
        sampler={"type": "grid"},
        space={"lr": {"type": "float", "low": 0.1, "high": 1.0}},
    )
    r = run_cli(server, "submit", str(grid))
    assert r.returncode == 2 and "space.lr" in r.stderr

    with server.http() as http:
        assert http.get("/api/v1/studies").json()["studies"] == []

    ok = write_spec(tmp_path / "ok.yaml", "ok")
    assert run_cli(server, "submit", str(ok)).returncode == 0
    r = run_cli(server, "submit", str(ok))
    assert r.returncode == 3 and "already exists" in r.stderr
    assert "--load-if-exists loads it" in r.stderr, r.stderr

    for command in ("trials", "pause", "export"):
        args = [command, "no-such-study"] + (["--csv"] if command == "export" else [])
        r = run_cli(server, *args)
        assert r.returncode == 3, (command, r.stderr)
        assert "no-such-study" in r.stderr
    r = run_cli(server, "trials", "4242")
    assert r.returncode == 3 and "4242" in r.stderr

    r = subprocess.run(
        [sys.executable, "-m", "hpo.api.cli", "studies", "--url", server.url, "--token", "nope"],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert r.returncode == 3 and "token" in r.stderr

    closed = f"http://127.0.0.1:{free_port()}"
    for args in (["studies"], ["submit", str(ok)]):
        r = run_cli(server, *args, url=closed)
        assert r.returncode == 4, (args, r.stderr)
        assert f"cannot reach the hpo server at {closed}" in r.stderr, r.stderr


def test_submit_invalid_yaml_syntax_is_bad_input(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\nspace: {lr: {type: float\n")
    # the spec is read before any request: no server is needed to refuse it
    r = run_cli(None, "submit", str(broken), url=f"http://127.0.0.1:{free_port()}")
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 2
    assert f'in "{broken}", line ' in r.stderr, r.stderr  # the file, not "<unicode string>"
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    r = run_cli(None, "submit", str(latin), url=f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and f"{latin}: not UTF-8 text" in r.stderr, r.stderr
    # how long to watch, without watching: said, not ignored (nothing is sent)
    spec = write_spec(tmp_path / "ok.yaml", "unwatched")
    url = f"http://127.0.0.1:{free_port()}"
    r = run_cli(None, "submit", str(spec), "--give-up-after", "60", url=url)
    assert r.returncode == 2 and "--give-up-after: only with --wait" in r.stderr, r.stderr
    for timeout in ("-1", "0", "nan", "soon"):  # was a failed check (exit 1) for -1
        r = subprocess.run(
            [sys.executable, "-m", "hpo.api.cli", "doctor", "--url", url, "--timeout", timeout],
            capture_output=True,
            text=True,
            env=cli_env(),
        )
        assert r.returncode == 2 and "argument --timeout" in r.stderr, (timeout, r.stderr)


def test_submit_wait_until_completed_and_until_stopped(
    sqlite_server: ServerProcess, tmp_path: Path
) -> None:
    server = sqlite_server
    done_spec = write_spec(tmp_path / "done.yaml", "waited", budget={"max_trials": 3})
    stop_spec = write_spec(tmp_path / "stop.yaml", "halted")
    done = subprocess.Popen(
        cli_command(server, "submit", str(done_spec), "--wait"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    halted = subprocess.Popen(
        cli_command(server, "submit", str(stop_spec), "--wait"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            sid = wait_for_study(server, "waited")
            with server.client() as client:
                study = client.study(sid)
                for value in (3.0, 1.0, 2.0):
                    time.sleep(0.3)
                    study.tell(study.ask(), value=value)
        except BaseException as exc:
            errors.append(exc)

    def halt() -> None:
        try:
            sid = wait_for_study(server, "halted")
            with server.client() as client:
                study = client.study(sid)
                t = study.ask()
                study.report(t, 0, {"loss": 1.0})
                time.sleep(1.0)
                study.stop()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drive), threading.Thread(target=halt)]
    for t in threads:
        t.start()
    try:
        done_out, done_err = done.communicate(timeout=60)
        halted_out, halted_err = halted.communicate(timeout=60)
    finally:
        for proc in (done, halted):
            if proc.poll() is None:
                proc.kill()
        for t in threads:
            t.join(timeout=30)
    assert errors == []

    assert done.returncode == 0, done_err
    assert "completed: budget spent" in done_out
    assert "best value 1.0" in done_out

    assert halted.returncode == 1, halted_err
    assert "stopped" in halted_out
    with server.http() as http:
        states = {
            s["name"]: (s["state"], s["counts"]["complete"])
            for s in http.get("/api/v1/studies").json()["studies"]
        }
    assert states == {"waited": ("completed", 3), "halted": ("stopped", 0)}


def test_serve_refuses_an_unreachable_database(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hpo.api.cli", "serve", "--port", "1"],
        env={
            **os.environ,
            "HPO_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "HPO_DATA_DIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cannot use the database postgresql://nobody@127.0.0.1:1/none" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["serve", "--port", "99999"], {}, "HPO_PORT: Input should be less than or equal to 65535"),
        (["serve", "--database-url", "sqlite://"], {}, "an in-memory SQLite database"),
        (["serve", "--database-url", "sqlite:///:memory:"], {}, "an in-memory SQLite database"),
        (["serve"], {"HPO_LEASE_SWEEP_INTERVAL_S": "0"}, "HPO_LEASE_SWEEP_INTERVAL_S"),
        (["serve"], {"HPO_LEASE_SWEEP_INTERVAL_S": "nan"}, "finite number"),
        (["serve"], {"HPO_SCHEDULER_INTERVAL_S": "-1"}, "HPO_SCHEDULER_INTERVAL_S"),
        (["serve"], {"HPO_SCHEDULER_LEASE_S": "0.5"}, "HPO_SCHEDULER_LEASE_S: 0.5 s is shorter"),
        (["serve"], {"HPO_RAY_NUM_CPUS": "-2"}, "HPO_RAY_NUM_CPUS: Input should be greater"),
        (["serve"], {"HPO_RAY_OBJECT_STORE_MB": "-5"}, "HPO_RAY_OBJECT_STORE_MB: Input should"),
        (["serve", "--data-dir", "{file}/sub"], {}, "Not a directory"),
        (["submit", "{tmp}"], {}, "Is a directory"),
        (["serve", "--database-url", "notaurl"], {}, "cannot use the database (the URL given)"),
        (["submit", "{deep}"], {}, "deep.yaml) nests too deeply to read"),
        (["submit", "/dev/zero"], {}, "/dev/zero: over 8388608 bytes"),
        (["submit", "{file}"], {}, "file: a study spec must be a YAML mapping; it is empty"),
        (["serve"], {"HPO_LOG_LEVEL": "bogus"}, "HPO_LOG_LEVEL: Input should be 'critical'"),
        (["serve", "--port", "{busy}"], {}, "Address already in use"),
        (
            ["serve", "--database-url", "sqlite:///file:{rodb}?mode=ro&uri=true"],
            {},
            "it cannot be written: attempt to write a readonly database",
        ),
    ],
)
def test_bad_options_and_paths_are_one_error_line_and_status_2(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "deep.yaml").write_text("space: " + "[" * 5000 + "]" * 5000)
    if any("{rodb}" in a for a in args):  # an hpo database, opened read-only
        engine = make_engine(f"sqlite:///{tmp_path / 'ro.db'}")
        upgrade_schema(engine)
        engine.dispose()
    busy = socket.socket()  # a port another program listens on
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    args = [
        a.format(
            file=tmp_path / "file",
            tmp=tmp_path,
            deep=tmp_path / "deep.yaml",
            rodb=tmp_path / "ro.db",
            busy=busy.getsockname()[1],
        )
        for a in args
    ]
    with busy:
        result = subprocess.run(
            [sys.executable, "-m", "hpo.api.cli", *args],
            env={**os.environ, "HPO_DATA_DIR": str(tmp_path / "data"), **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert says in result.stderr, result.stderr[-2000:]
    assert "hpo serving on" not in result.stdout + result.stderr  # refused before it serves


def test_watch_warns_when_no_server_runs_the_scheduler_for_a_study_with_a_trainable(
    sqlite_server: ServerProcess, tmp_path: Path
) -> None:
    server = sqlite_server  # started with HPO_SCHEDULER=false: nobody holds the lease
    with server.http() as http:
        assert http.get("/healthz").json()["scheduler_running"] is False
        spec = simple_spec(
            "needs-a-scheduler",
            trainable={"name": "synthetic"},
            space={"x": {"type": "float", "low": -5.0, "high": 5.0}},
        )
        created = http.post("/api/v1/studies", json=spec)
        assert created.status_code == 201, created.text
    seen = watch_output(server, "needs-a-scheduler", until="run the scheduler")
    assert "no hpo serve of this database has run the scheduler" in seen, seen
    # a plain submit (no watch) says so at once; an ask/tell study needs no scheduler
    trainable = write_spec(
        tmp_path / "t.yaml",
        "submitted-with-a-trainable",
        trainable={"name": "synthetic"},
        space={"x": {"type": "float", "low": -5.0, "high": 5.0}},
    )
    r = run_cli(server, "submit", str(trainable))
    assert r.returncode == 0 and "created" in r.stdout, r.stderr
    assert "will not start until one does" in r.stderr, r.stderr
    r = run_cli(server, "submit", str(write_spec(tmp_path / "a.yaml", "ask-tell-only")))
    assert r.returncode == 0 and "scheduler" not in r.stderr, r.stderr
    # a server that runs the scheduler (on a database of its own: no study to start Ray
    # for) holds the lease
    (tmp_path / "leader").mkdir()
    leader_db = f"sqlite:///{tmp_path / 'leader' / 'hpo.db'}"
    with ServerProcess(leader_db, tmp_path / "leader", {}) as leader, leader.http() as http:
        wait_for(lambda: http.get("/healthz").json()["scheduler_running"], timeout=30)


def test_a_reader_that_leaves_early_ends_the_cli_quietly() -> None:
    # `hpo token | head -c 0`: the pipe is closed before anything is written
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo.api.cli", "token"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**cli_env(), "HPO_TOKEN": "some-token"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    errors = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, errors  # as a shell reports SIGPIPE
    assert errors == ""  # no traceback, no "Exception ignored" at exit


def test_values_and_errors_are_printed_as_they_are_not_as_markup(
    sqlite_server: ServerProcess, tmp_path: Path
) -> None:
    """A choice, an error or a path with brackets is printed literally: rich read
    ``[bold]adam`` as markup (``hpo best`` said ``c = adam``) and ``[/]`` as a broken tag (a
    traceback, also mid-``watch``)."""
    server = sqlite_server
    space = {"c": {"type": "categorical", "choices": ["[bold]adam", "[/]"]}}
    with server.http() as http:
        sid = http.post("/api/v1/studies", json=simple_spec("brackets", space=space)).json()["id"]
        for c, value in (("[bold]adam", 0.1), ("[/]", 0.9)):
            t = http.post(f"/api/v1/studies/{sid}/ask", json={"params": {"c": c}}).json()
            http.post(f"/api/v1/trials/{t['trial_id']}/tell", json={"value": value})
        t = http.post(f"/api/v1/studies/{sid}/ask", json={"params": {"c": "[/]"}}).json()
        failed = {"state": "failed", "error": "OSError: cannot read [/data/train.csv]"}
        http.post(f"/api/v1/trials/{t['trial_id']}/tell", json=failed)
    seen = watch_output(server, "brackets", until="[/data/train.csv]", timeout=30)
    assert "(OSError: cannot read [/data/train.csv])" in seen and "Traceback" not in seen, seen
    best = run_cli(server, "best", "brackets")
    assert best.returncode == 0 and "c = [bold]adam" in best.stdout, best.stdout + best.stderr
    listed = run_cli(server, "trials", "brackets")
    assert listed.returncode == 0 and "[/]" in listed.stdout, listed.stdout + listed.stderr
    missing = run_cli(server, "submit", str(tmp_path / "exp[v2]" / "study.yaml"))
    assert missing.returncode == 2 and "exp[v2]/study.yaml" in missing.stderr, missing.stderr


@pytest.mark.parametrize(
    ("status", "content_type", "body", "says"),
    [
        (200, "application/json", b"[]", "with no JSON object, as an hpo server never does"),
        (200, "text/html", b"<html>hi</html>", "with no JSON object, as an hpo server never does"),
        (200, "application/json", b'{"studies": [{"id": "x"}]}', "does not read as a StudyRecord"),
        (404, "application/json", b"[1]", "HTTP 404: [1] (from GET http://"),
        (400, "application/json", b"null", "HTTP 400: null (from GET http://"),
    ],
)
def test_an_answer_from_something_else_than_an_hpo_server_is_an_error_line(
    status: int, content_type: str, body: bytes, says: str
) -> None:
    """A URL that is not an hpo server's API (another service, a proxy's page, a wrong base
    path) is one error line naming the URL, exit 3: these were tracebacks (``'list' object
    has no attribute 'get'``) or "invalid study spec" for a spec nobody gave."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        r = run_cli(None, "studies", url=url)
    finally:
        other.shutdown()
    assert r.returncode == 3, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and says in r.stderr, r.stderr
    assert "/api/v1/studies" in r.stderr or "StudyRecord" in says, r.stderr  # the URL asked


def test_watch_and_submit_say_why_a_study_runs_no_trial(
    sqlite_server: ServerProcess, tmp_path: Path
) -> None:
    """A watch of an ask/tell study says its trials come from clients, a watch of a paused
    study says it is paused (each was silent until Ctrl-C), and a study loaded by its spec
    that is not running says what it needs (it said "runs on its stored spec")."""
    server = sqlite_server
    spec = write_spec(tmp_path / "quiet.yaml", "quiet")
    assert run_cli(server, "submit", str(spec)).returncode == 0
    seen = watch_output(server, "quiet", until="no trainable", timeout=30)
    assert "note: study quiet has no trainable: its trials come from ask/tell clients" in seen
    assert run_cli(server, "pause", "quiet").returncode == 0
    seen = watch_output(server, "quiet", until="is paused", timeout=30)
    assert "study quiet is paused: no trial of it starts until `hpo resume quiet`" in seen, seen
    r = run_cli(server, "submit", str(spec), "--load-if-exists")
    assert r.returncode == 0 and "it is paused: no trial of it starts until" in r.stdout, r.stdout
    assert run_cli(server, "stop", "quiet").returncode == 0
    r = run_cli(server, "submit", str(spec), "--load-if-exists")
    assert "it is stopped: a stopped study takes no more trials" in r.stdout, r.stdout


def test_a_reader_that_leaves_a_table_early_ends_the_cli_with_141(
    sqlite_server: ServerProcess,
) -> None:
    """``hpo trials x | head -1``: rich's console answers a closed pipe with exit status 1
    (which says the study failed); the CLI ends with 141, as a shell reports SIGPIPE."""
    server = sqlite_server
    with server.client() as client:
        study = client.create_study(simple_spec("piped"))
        for _ in range(3):
            study.tell(study.ask(), value=1.0)
    proc = subprocess.Popen(
        cli_command(server, "trials", "piped"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    errors = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, errors
    assert errors == ""


def test_submit_says_its_study_plainly_where_colours_are_forced(
    sqlite_server: ServerProcess, tmp_path: Path
) -> None:
    """FORCE_COLOR (passed on by sbatch from a user's shell) coloured the number in
    ``study 12 (name) created``, and the Slurm recipe, reading the id from it, found none."""
    spec = write_spec(tmp_path / "colour.yaml", "colour")
    r = subprocess.run(
        cli_command(sqlite_server, "submit", str(spec)),
        capture_output=True,
        text=True,
        timeout=60,
        env={**cli_env(), "FORCE_COLOR": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert re.search(r"^study \d+ \(colour\) created$", r.stdout, re.M), repr(r.stdout)
