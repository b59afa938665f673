"""The dashboard's analyses in a worker process (service/analysis_worker.py): the same answers
as on the server's thread, errors raised as themselves, and a worker that dies (kill -9,
during a job or between jobs) replaced without losing the job; a job past its time limit
stopped; a worker whose server was killed -9 ends on its own; a database outage answered
unavailable by the same worker, which reads again once the database is back.

The helper jobs below live in this module: the worker (which leaves the working directory
off its path) imports them through PYTHONPATH, set to the repository's root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from hpo.service import local_ray
from hpo.service.analysis_worker import (
    AnalysisWorker,
    InThread,
    Workspace,
    analyses_for,
    fit_contour,
    fit_importance,
)
from hpo.service.db import make_engine, upgrade_schema
from hpo.service.errors import AnalysisUnavailable, DatabaseUnavailable, StudyNotFound
from hpo.service.spec import StudySpec
from hpo.service.storage import Storage
from hpo.service.studies import StudyService
from tests.api.test_outage import set_reachable
from tests.conftest import create_pg_database, drop_pg_database, simple_spec, wait_for


def _study(storage: Storage, n: int = 40) -> tuple[int, StudySpec]:
    service = StudyService(storage)
    spec = StudySpec.model_validate(simple_spec("analysed"))
    sid = service.create_study(spec).id
    for _ in range(n):
        t = service.ask(sid)
        service.tell(t.id, value=t.params["x"] ** 2 + 0.01 * t.params["n"])
    return sid, spec


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _jobs_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


# The tests of the worker as a process (its deaths, its time limit, its import path, its
# parent killed) do not depend on the database: SQLite only. Its reads are tested on both.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def _die(ws: Workspace) -> None:
    """A job that kills the process it runs in (the worker), as the OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


def _die_once(ws: Workspace, marker: str) -> int:
    """Killed the first time (``marker`` absent); its worker's pid the next time."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def _pid(ws: Workspace) -> int:
    return os.getpid()


def _cwd_path(ws: Workspace) -> bool:
    import sys

    return "" in sys.path or os.getcwd() in sys.path


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_worker_answers_what_the_server_thread_answers(storage: Storage, db_url: str) -> None:
    sid, spec = _study(storage)
    worker = AnalysisWorker(db_url)
    here = InThread(storage)
    try:
        jobs = [(fit_importance, (sid, spec, 0)), (fit_contour, (sid, spec, "x", "n", 0, 8))]
        for fn, args in jobs:
            theirs = worker.run(fn, *args)
            assert theirs == here.run(fn, *args)
        assert theirs["points"] and len(theirs["x"]["values"]) == 8
        assert worker.run(fit_importance, sid, spec, 0).importances["x"] > 0.5
        assert worker.run(_pid) == worker.pid != os.getpid()
        with pytest.raises(StudyNotFound):  # raised in the worker, raised here as itself
            worker.run(fit_importance, sid + 1000, spec, 0)
        # a trial told since: the worker's copy of the study follows (fitted again)
        t = StudyService(storage).ask(sid)
        StudyService(storage).tell(t.id, value=0.5)
        assert worker.run(fit_importance, sid, spec, 0).n_trials == 41
    finally:
        worker.close()
    assert worker.pid is None
    with pytest.raises(AnalysisUnavailable):
        worker.run(fit_importance, sid, spec, 0)


def test_a_spec_edited_since_a_fit_is_fitted_again(storage: Storage) -> None:
    """The fits kept between jobs are keyed by the complete trials and by the spec: a
    parameter added since (define-by-run) is in the next fit, not the kept one."""
    sid, spec = _study(storage, 12)
    here = InThread(storage)
    assert set(here.run(fit_importance, sid, spec, 0).importances) == {"x", "n"}
    wider = StudySpec.model_validate(
        {
            **spec.model_dump(),
            "space": {**spec.model_dump()["space"], "z": {"type": "float", "low": 0, "high": 1}},
        }
    )
    assert set(here.run(fit_importance, sid, wider, 0).importances) == {"x", "n", "z"}
    grid = here.run(fit_contour, sid, wider, "x", "z", 0, 4)
    assert grid["y"]["name"] == "z"


@SQLITE_ONLY
def test_a_worker_killed_during_a_job_or_between_jobs_is_replaced(
    storage: Storage, db_url: str, tmp_path: Path
) -> None:
    sid, spec = _study(storage, n=20)
    worker = AnalysisWorker(db_url, cooldown_s=2.0)
    try:
        worker.warm()
        first = worker.pid
        os.kill(first, signal.SIGKILL)  # between jobs: the next job finds it gone
        wait_for(lambda: _gone(first), 10, "the killed worker")
        assert worker.run(fit_importance, sid, spec, 0).n_trials == 20
        second = worker.pid
        assert second not in (None, first)
        # killed during a job: another worker runs the same job, which is answered
        marker = str(tmp_path / "killed-once")
        third = worker.run(_die_once, marker)
        assert os.path.exists(marker) and third == worker.pid and third not in (first, second)
        # a job that kills its worker each time: started again once, then 503 (not a hang),
        # and no worker started for the cool-down
        with pytest.raises(AnalysisUnavailable, match="failed twice"):
            worker.run(_die)
        with pytest.raises(AnalysisUnavailable, match="trying again shortly") as refused:
            worker.run(fit_importance, sid, spec, 0)
        assert 1 <= refused.value.retry_after_s <= 2
        time.sleep(2.1)  # the cool-down is over
        assert worker.run(fit_importance, sid, spec, 0).n_trials == 20
        assert worker.pid not in (None, first, second, third)
    finally:
        worker.close()


@SQLITE_ONLY
def test_a_job_past_its_time_limit_stops_the_worker(storage: Storage, db_url: str) -> None:
    sid, spec = _study(storage, n=5)
    worker = AnalysisWorker(db_url, cooldown_s=1.0)
    try:
        stuck = worker.run(_pid)  # started, its imports done
        worker.job_timeout_s = 1.0
        os.kill(stuck, signal.SIGSTOP)  # a worker that never answers
        started = time.monotonic()
        with pytest.raises(AnalysisUnavailable, match="outlasted 1 s"):
            worker.run(fit_importance, sid, spec, 0)
        assert time.monotonic() - started < 30
        assert _gone(stuck)  # killed, not left stopped
        with pytest.raises(AnalysisUnavailable, match="trying again shortly"):
            worker.run(fit_importance, sid, spec, 0)  # not a new worker per poll
        time.sleep(1.1)
        worker.job_timeout_s = 120
        assert worker.run(fit_importance, sid, spec, 0).n_trials == 5  # a new one
    finally:
        worker.close()


@SQLITE_ONLY
def test_the_worker_does_not_import_from_the_working_directory(
    storage: Storage, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sklearn").mkdir()
    (tmp_path / "sklearn" / "__init__.py").write_text("raise SystemExit('the wrong sklearn')")
    monkeypatch.chdir(tmp_path)
    for safe_path in ("", "1"):  # PYTHONSAFEPATH: the interpreter leaves it off itself
        monkeypatch.setenv("PYTHONSAFEPATH", safe_path)
        worker = AnalysisWorker(db_url)
        try:
            assert worker.run(_cwd_path) is False
        finally:
            worker.close()


@SQLITE_ONLY
def test_the_worker_of_a_killed_server_ends_on_its_own(storage: Storage, db_url: str) -> None:
    """kill -9 of the server's process: its end of the socket closes, the worker reads EOF
    and exits (no orphan left holding the database)."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys, time
                from hpo.service.analysis_worker import AnalysisWorker
                worker = AnalysisWorker(sys.argv[1])
                worker.warm()
                print(worker.pid, flush=True)
                time.sleep(600)
                """
            ),
            db_url,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child = int(server.stdout.readline())
        assert psutil.Process(child).ppid() == server.pid
    finally:
        server.kill()
        server.wait()
    wait_for(lambda: _gone(child), 60, "the orphaned analysis worker to exit")


def test_a_database_outage_in_the_worker_is_answered_unavailable_and_passes(
    pg_available: bool,
) -> None:
    """PostgreSQL refusing connections while the worker reads (its connection ended too): the
    job raises DatabaseUnavailable (the API's 503 with Retry-After), not an error of its own;
    the same worker answers again once the database is back, with what was told meanwhile."""
    if not pg_available:
        pytest.skip("PostgreSQL not reachable")
    url = create_pg_database()
    engine = make_engine(url)
    worker = AnalysisWorker(url)
    try:
        upgrade_schema(engine)
        storage = Storage(engine)
        sid, spec = _study(storage, 20)
        assert worker.run(fit_importance, sid, spec, 0).n_trials == 20
        pid = worker.pid
        t = StudyService(storage).ask(sid)
        StudyService(storage).tell(t.id, value=0.5)  # new: the worker must read again
        set_reachable(url, False)
        try:
            with pytest.raises(DatabaseUnavailable):
                worker.run(fit_importance, sid, spec, 0)
        finally:
            set_reachable(url, True)
        assert worker.run(fit_importance, sid, spec, 0).n_trials == 21
        assert worker.pid == pid  # an outage is not a reason to replace the worker
    finally:
        worker.close()
        engine.dispose()
        drop_pg_database(url)


@SQLITE_ONLY
def test_the_worker_is_not_counted_as_the_local_ray_session(db_url: str) -> None:
    """The server records its descendants as its local Ray session and reaps them with Ray
    (``RayExecutor.shutdown``, also when another server takes the scheduler over): not its
    analysis worker."""
    worker = AnalysisWorker(db_url)
    try:
        worker.warm()
        pid = worker.pid
        assert pid in [p.pid for p in psutil.Process().children()]
        assert pid not in [p.pid for p in local_ray.descendants()]
    finally:
        worker.close()
    assert pid not in local_ray._NOT_RAY


def test_an_in_memory_database_is_analysed_on_the_server_thread() -> None:
    storage = Storage(make_engine("sqlite://"))
    assert isinstance(analyses_for(storage, "sqlite://"), InThread)
    assert isinstance(analyses_for(storage, "sqlite:///:memory:"), InThread)
    assert isinstance(analyses_for(storage, "sqlite:////tmp/x.db"), AnalysisWorker)
    assert isinstance(analyses_for(storage, "sqlite:///file:/tmp/x.db?uri=true"), AnalysisWorker)
    memory = "sqlite:///file::memory:?cache=shared&uri=true"
    assert isinstance(analyses_for(storage, memory), InThread)
    # a shared in-memory database (a URI) lives in this process too: a worker would see an
    # empty database and answer "no such study"
    shared = f"sqlite:///file:analysed{os.getpid()}?mode=memory&cache=shared&uri=true"
    engine = make_engine(shared)
    keep = engine.connect()  # the shared database lives while a connection holds it
    try:
        upgrade_schema(engine)
        storage = Storage(engine)
        sid, spec = _study(storage)
        analyses = analyses_for(storage, shared)
        assert isinstance(analyses, InThread)
        assert analyses.run(fit_importance, sid, spec, 0).n_trials == 40
    finally:
        keep.close()
        engine.dispose()
