"""Slow work off the request thread, over real HTTP: a GP ask past ``HPO_ASK_WAIT_S`` answers
503 with Retry-After and its retry gets the kept suggestion (the Python client retries it by
itself); parameter importance answers 202 / the last result while it is fitted, and a restarted
server answers what was fitted before from the database while the study is unchanged."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import ServerProcess, simple_spec, wait_for

API = "/api/v1"


def impatient(url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    env = {
        "HPO_SCHEDULER": "false",
        "HPO_ASK_WAIT_S": "0.01",
        "HPO_IMPORTANCE_WAIT_S": "0",
        "HPO_IMPORTANCE_WAIT_TRIALS": "10",  # past 10 complete trials, no wait at all
    }
    with ServerProcess(url, tmp_path, env) as proc:
        yield proc


@pytest.fixture
def impatient_server(db_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    yield from impatient(db_url, tmp_path)


@pytest.fixture
def impatient_sqlite(sqlite_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    yield from impatient(sqlite_url, tmp_path)


def _ask(http: httpx.Client, sid: int, key: str) -> httpx.Response:
    return http.post(f"{API}/studies/{sid}/ask", headers={"Idempotency-Key": key})


def test_a_slow_gp_ask_answers_503_and_its_retry_gets_the_suggestion(
    impatient_server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    spec = simple_spec("gp", sampler={"type": "gp", "seed": 0, "n_startup_trials": 2})
    with impatient_server.http() as http:
        sid = http.post(f"{API}/studies", json=spec).json()["id"]
        refused = 0
        for i in range(4):
            answer = _ask(http, sid, f"ask-{i}")
            while answer.status_code == 503:  # as a client honouring Retry-After does
                assert answer.headers["Retry-After"] == "1", answer.headers
                assert answer.json()["error"] == "suggestion_pending", answer.text
                refused += 1
                answer = _ask(http, sid, f"ask-{i}")
            assert answer.status_code == 201, answer.text
            trial = answer.json()
            assert trial["number"] == i
            again = _ask(http, sid, f"ask-{i}")  # the key still names the trial it created
            assert again.status_code == 201 and again.json()["trial_id"] == trial["trial_id"]
            x = trial["params"]["x"]
            told = http.post(f"{API}/trials/{trial['trial_id']}/tell", json={"value": x * x})
            assert told.status_code == 200, told.text
        assert refused >= 1  # the GP fits (and the torch import) outlast 10 ms

    caplog.set_level(logging.INFO, logger="hpo.api.retry")
    study = impatient_server.client().study(sid)
    trial = study.ask()  # retried on 503 with Retry-After by the client itself
    assert trial.number == 4
    assert any("HTTP 503" in r.getMessage() for r in caplog.records), caplog.text
    with impatient_server.http() as http:  # every ask made one trial: none orphaned, none twice
        trials = http.get(f"{API}/studies/{sid}/trials").json()["trials"]
    assert sorted(t["number"] for t in trials) == [0, 1, 2, 3, 4]


def test_importance_and_contours_are_fitted_off_the_request(
    impatient_sqlite: ServerProcess, tmp_path: Path
) -> None:
    with impatient_sqlite.http() as http:
        spec = simple_spec("imp", budget={"max_trials": 60})
        sid = http.post(f"{API}/studies", json=spec).json()["id"]

        def finish() -> None:
            t = http.post(f"{API}/studies/{sid}/ask").json()
            body = {"value": t["params"]["x"] ** 2 + 0.01 * t["params"]["n"]}
            assert http.post(f"{API}/trials/{t['trial_id']}/tell", json=body).status_code == 200

        for _ in range(30):
            finish()
        path = f"{API}/studies/{sid}/importance"
        first = http.get(path)
        assert first.status_code == 202, first.text
        assert first.json()["status"] == "computing" and first.json()["importances"] == {}
        assert first.headers["Retry-After"] == "1" and "ETag" not in first.headers
        ready = wait_for(
            lambda: (r := http.get(path)).status_code == 200 and r, 60, "the fitted importance"
        )
        body = ready.json()
        assert body["status"] == "ready" and body["n_trials"] == body["n_fitted"] == 30
        assert body["importances"]["x"] > 0.5
        assert http.get(path, headers={"If-None-Match": ready.headers["ETag"]}).status_code == 304

        finish()  # the study changed: the last answer while the new fit runs
        stale = http.get(path)
        assert stale.status_code == 200 and stale.json()["status"] == "computing"
        assert stale.json()["importances"] == body["importances"]
        assert "ETag" not in stale.headers
        wait_for(lambda: http.get(path).json()["n_trials"] == 31, 60, "the refitted importance")

        contour = f"{API}/studies/{sid}/contour?x=x&y=n&size=8"
        first = http.get(contour)
        assert first.status_code == 202 and first.json()["status"] == "computing", first.text
        assert first.json()["z"] == [] and first.json()["x"]["name"] == "x"
        grid = wait_for(
            lambda: (r := http.get(contour)).status_code == 200 and r.json(), 60, "the contour"
        )
        assert len(grid["x"]["values"]) == 8 and len(grid["points"]) == 31

        # They were fitted in the server's analysis worker, a child process: kill -9 it
        # (the OOM killer's way); the next fit starts another and is answered.
        (worker,) = psutil.Process(impatient_sqlite.proc.pid).children()
        assert "analysis_worker" in " ".join(worker.cmdline())
        worker.kill()
        finish()
        wait_for(lambda: http.get(path).json()["n_trials"] == 32, 60, "importance, new worker")
        (again,) = psutil.Process(impatient_sqlite.proc.pid).children()
        assert again.pid != worker.pid
        tag = wait_for(
            lambda: (r := http.get(path)).status_code == 200 and r.headers.get("ETag"), 60, "tag"
        )
        grid = wait_for(
            lambda: (r := http.get(contour)).status_code == 200 and r.json(), 60, "the contour"
        )

    # kill -9 the server: a new one answers both from what was kept at rest, at once (with
    # HPO_IMPORTANCE_WAIT_S=0 a fit is never waited for: its first answer would be 202)
    impatient_sqlite.restart()
    server = psutil.Process(impatient_sqlite.proc.pid)
    assert server.children() == []  # no study needs a fit: no worker started with the server
    with impatient_sqlite.http() as http:
        kept = http.get(path)
        assert kept.status_code == 200 and kept.json()["status"] == "ready", kept.text
        assert kept.json()["n_trials"] == 32 and kept.headers["ETag"] == tag
        bare = contour + "&points=false"  # as the page asks: a contour is kept without points
        again = http.get(bare)
        assert again.status_code == 200 and again.json() == {**grid, "points": []}
        assert again.headers["ETag"]
        assert server.children() == []  # answered without a fit
        # a second server on the same database answers them from there too
        (tmp_path / "second").mkdir()
        env = impatient_sqlite.extra_env
        with ServerProcess(impatient_sqlite.database_url, tmp_path / "second", env) as second:
            with second.http() as other:
                theirs = other.get(path)
                assert theirs.status_code == 200 and theirs.headers["ETag"] == tag
                assert theirs.json() == kept.json()
                assert other.get(bare).json() == {**grid, "points": []}
            assert psutil.Process(second.proc.pid).children() == []
        full = wait_for(  # with its points: fitted (a new worker), then answered
            lambda: (r := http.get(contour)).status_code == 200 and r.json(), 60, "points"
        )
        assert full == grid and len(server.children()) == 1
        finish()  # the study changed: what is kept is the last answer while it is refitted
        stale = http.get(path)
        assert stale.status_code == 200 and stale.json()["status"] == "computing"
        assert stale.json()["n_trials"] == 32
        assert http.get(bare).status_code == 202
        wait_for(lambda: http.get(path).json()["n_trials"] == 33, 60, "importance, refitted")
        finish()  # changed again, and nothing fitted since

    impatient_sqlite.restart()  # a study whose page needs a fit: the worker starts at once
    assert len(psutil.Process(impatient_sqlite.proc.pid).children()) == 1
