"""Drill: ``hpo watch`` (and so ``hpo submit --wait``) while its server is killed with SIGKILL
and started again on the same database and port: the watch says that the server does not
answer, goes on, shows each trial that ended meanwhile once, and exits 0 when the study
completes (and so does a notebook's ``Study.wait()``); without a restart it gives up after
``--give-up-after`` with exit 4."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from pathlib import Path

from tests.api.test_cli import cli_command, cli_env
from tests.conftest import ServerProcess, simple_spec
from tests.faults.conftest import OwnPostgres


class Watch:
    """``hpo watch`` in a subprocess, its output read line by line in a thread."""

    def __init__(self, server: ServerProcess, study: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            cli_command(server, "watch", study, *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=cli_env(),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen = ""
        assert self.proc.stdout is not None
        out = self.proc.stdout
        threading.Thread(target=lambda: [self.lines.put(x) for x in out], daemon=True).start()

    def until(self, text: str, timeout: float = 60) -> str:
        """Everything printed so far, once ``text`` is among it (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen and (left := deadline - time.monotonic()) > 0:
            try:
                self.seen += self.lines.get(timeout=left)
            except queue.Empty:
                break
        assert text in self.seen, f"{text!r} never printed; so far:\n{self.seen}"
        return self.seen

    def end(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.2)  # the reader thread's last lines
        while not self.lines.empty():
            self.seen += self.lines.get()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def test_watch_rides_out_a_server_restart_and_sees_the_study_end(
    sqlite_server: ServerProcess,
) -> None:
    server = sqlite_server
    study = server.client().create_study(simple_spec("restarted", budget={"max_trials": 3}))
    first = study.ask()
    study.tell(first, 1.0)
    watch = Watch(server, "restarted", "--give-up-after", "120")
    waited: list[object] = []  # a notebook's Study.wait() across the same restart
    waiter = threading.Thread(target=lambda: waited.append(study.wait(poll_s=0.2)))
    waiter.start()
    try:
        watch.until("trial   0")
        server.kill()  # SIGKILL, mid-study
        watch.until("does not answer", timeout=30)
        time.sleep(1)  # a few more looks at a server that is not there
        assert watch.proc.poll() is None, watch.seen
        server.start()  # the same database and port
        study = server.client().study("restarted")
        for value in (2.0, 3.0):
            trial = study.ask()
            study.tell(trial, value)
        code = watch.end()
        waiter.join(timeout=60)
    finally:
        watch.kill()
    assert code == 0, watch.seen
    assert [getattr(r, "state", r) for r in waited] == ["completed"]
    assert "answers again" in watch.seen, watch.seen
    for number in (0, 1, 2):  # each finished trial shown once, the ones of the restart too
        assert watch.seen.count(f"trial   {number} complete") == 1, watch.seen
    assert "study 1 completed" in watch.seen, watch.seen
    assert "Traceback" not in watch.seen, watch.seen


def test_watch_gives_up_on_a_server_that_stays_away(sqlite_server: ServerProcess) -> None:
    server = sqlite_server
    study = server.client().create_study(simple_spec("abandoned", budget={"max_trials": 3}))
    study.tell(study.ask(), 1.0)
    watch = Watch(server, "abandoned", "--give-up-after", "10")
    try:
        watch.until("trial   0")  # it watches
        gone = time.monotonic()
        server.kill()
        code = watch.end(timeout=60)
        waited = time.monotonic() - gone
    finally:
        watch.kill()
    assert code == 4, watch.seen
    assert "does not answer" in watch.seen
    assert "\nerror: cannot reach the hpo server" in watch.seen  # not after the bar, on its line
    assert waited >= 10, (waited, watch.seen)  # not before its limit


def test_watch_rides_out_the_database_away_for_20_s(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    """The server stays up and answers 503 while its database is away: 20 s, or until the
    watch has said so (one read's own retries run out first: about 25 s with the server's
    Retry-After of 5 s). The watch waits, and shows the trial that ends after the database
    is back, once; the old watch exited 3 there."""
    server = ServerProcess(own_postgres.url, tmp_path, {"HPO_SCHEDULER": "false"})
    with server:
        study = server.client().create_study(simple_spec("db-away", budget={"max_trials": 2}))
        study.tell(study.ask(), 1.0)
        watch = Watch(server, "db-away", "--give-up-after", "120")
        try:
            watch.until("trial   0")
            own_postgres.stop("immediate")
            gone = time.monotonic()
            watch.until("does not answer", timeout=90)
            time.sleep(max(0.0, 20 - (time.monotonic() - gone)))
            own_postgres.start()
            study = server.client().study("db-away")
            study.tell(study.ask(), 2.0)
            code = watch.end(timeout=120)
        finally:
            watch.kill()
    assert code == 0, watch.seen
    assert "answers again" in watch.seen, watch.seen
    for number in (0, 1):
        assert watch.seen.count(f"trial   {number} complete") == 1, watch.seen
