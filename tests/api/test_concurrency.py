"""Racing askers over real HTTP: two server processes on one database, many clients each.

No grid point and no slot of ``max_trials`` is ever handed out twice, on SQLite (serialized
writes) and on PostgreSQL (row locks + compare-and-set of the trial number).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, simple_spec

CLIENTS = 12
GRID_SPACE = {  # 24 points
    "a": {"type": "int", "low": 0, "high": 5},
    "b": {"type": "categorical", "choices": ["x", "y", "z", "w"]},
}


def reported(
    body: Callable[..., None], errors: list[str], barrier: threading.Barrier | None = None
) -> Callable[..., None]:
    """``body`` as a thread's target: whatever it raises lands in ``errors`` (and breaks
    ``barrier``, so no other thread waits for it), for the test's thread to assert on; an
    exception left in a thread only warns."""

    def run(*args: object) -> None:
        try:
            body(*args)
        except BaseException as exc:
            errors.append(f"{body.__name__}: {exc!r}")
            if barrier is not None:
                barrier.abort()

    return run


def run_clients(
    worker: Callable[[int], None],
    errors: list[str],
    start: threading.Barrier | None = None,
    *,
    timeout: float = 120,
    daemon: bool = False,
) -> None:
    """``worker(i)`` for each of CLIENTS clients, each in a thread of its own (released together
    by ``start``, if given); then, in the test's thread, what any of them raised or noted in
    ``errors`` is asserted empty (an exception left in a thread only warns) and none may still
    run."""
    threads = [
        threading.Thread(target=reported(worker, errors, start), args=(i,), daemon=daemon)
        for i in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a racing client never finished"


@pytest.fixture
def two_servers(db_url: str, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    servers = []
    for i in range(2):
        data = tmp_path / f"server{i}"
        data.mkdir()
        proc = ServerProcess(db_url, data, {"HPO_SCHEDULER": "false"})
        proc.token = "shared-token"
        servers.append(proc)
    try:
        for proc in servers:
            proc.start()
        yield servers
    finally:
        for proc in servers:
            proc.stop()


def race(servers: list[ServerProcess], study_id: int, *, fresh: bool = False) -> list[dict]:
    """CLIENTS threads ask (and tell) until the service says 409; returns every trial handed out.
    ``fresh``: every request on a connection of its own (accepted by any worker of
    ``hpo serve --workers N``)."""
    handed: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)
    close = {"Connection": "close"} if fresh else {}

    def worker(i: int) -> None:
        server = servers[i % len(servers)]
        with httpx.Client(
            base_url=server.url,
            headers={"Authorization": f"Bearer {server.token}", **close},
            timeout=60,
        ) as http:
            start.wait()
            while True:
                r = http.post(f"/api/v1/studies/{study_id}/ask")
                if r.status_code == 409:
                    return
                if r.status_code != 201:
                    errors.append(f"{r.status_code} {r.text}")
                    return
                trial = r.json()
                with lock:
                    handed.append(trial)
                told = http.post(f"/api/v1/trials/{trial['trial_id']}/tell", json={"value": 1.0})
                if told.status_code != 200:
                    errors.append(f"tell {told.status_code} {told.text}")
                    return

    run_clients(worker, errors, start, timeout=300)
    return handed


def test_grid_points_are_handed_out_exactly_once(two_servers: list[ServerProcess]) -> None:
    spec = simple_spec("grid-race", sampler={"type": "grid"}, space=GRID_SPACE)
    with two_servers[0].http() as http:
        study_id = http.post("/api/v1/studies", json=spec).json()["id"]
    handed = race(two_servers, study_id)
    points = [(t["params"]["a"], t["params"]["b"]) for t in handed]
    assert len(points) == 24 == len(set(points))
    assert sorted(t["number"] for t in handed) == list(range(24))
    with two_servers[1].http() as http:
        study = http.get(f"/api/v1/studies/{study_id}").json()
        assert study["state"] == "completed"
        assert study["counts"]["complete"] == 24 and study["n_trials"] == 24
        answer = http.post(f"/api/v1/studies/{study_id}/ask")
        assert answer.status_code == 409 and "exhausted" in answer.json()["message"]


def test_last_budget_slots_are_never_exceeded(two_servers: list[ServerProcess]) -> None:
    spec = simple_spec("budget-race", budget={"max_trials": 17})
    with two_servers[0].http() as http:
        study_id = http.post("/api/v1/studies", json=spec).json()["id"]
    handed = race(two_servers, study_id)
    assert len(handed) == 17
    assert sorted(t["number"] for t in handed) == list(range(17))
    assert len({t["trial_id"] for t in handed}) == 17
    with two_servers[1].http() as http:
        trials = http.get(f"/api/v1/studies/{study_id}/trials").json()["trials"]
        assert len(trials) == 17


def test_retried_trials_keep_their_number_and_spend_no_budget_under_racing_asks(
    two_servers: list[ServerProcess],
) -> None:
    """Racing clients through two servers abandon the first attempt of every fourth trial (a
    client that died: no tell, its 3-s lease runs out). Each abandoned trial goes back to
    waiting and is handed out again, with its number and parameters, to whichever asker
    comes next; the study ends with exactly max_trials trials, each (number, attempt) handed
    out once."""
    # 3 s: long enough that no told trial's ask-to-tell outlasts it on a loaded machine
    spec = simple_spec("retry-race", lease_s=3, max_retries=1, budget={"max_trials": 12})
    with two_servers[0].http() as http:
        study_id = http.post("/api/v1/studies", json=spec).json()["id"]
    handed: list[dict] = []  # list.append is atomic: no lock needed
    errors: list[str] = []
    start = threading.Barrier(CLIENTS)

    def study_state(http: httpx.Client) -> str:
        return http.get(f"/api/v1/studies/{study_id}").json()["state"]

    def worker(i: int) -> None:
        server = two_servers[i % 2]
        headers = {"Authorization": f"Bearer {server.token}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            start.wait()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                r = http.post(f"/api/v1/studies/{study_id}/ask")
                if r.status_code == 409:  # all numbers out: wait for a retry, or the end
                    if study_state(http) == "completed":
                        return
                    time.sleep(0.2)
                    continue
                assert r.status_code == 201, f"{r.status_code} {r.text}"
                trial = r.json()
                handed.append(trial)
                if trial["number"] % 4 == 0 and trial["attempt"] == 1:
                    continue  # this client "died": no tell, the lease runs out
                tell = {"value": 1.0, "attempt": trial["attempt"]}  # a retry names its attempt
                told = http.post(f"/api/v1/trials/{trial['trial_id']}/tell", json=tell)
                assert told.status_code == 200, f"tell {told.status_code} {told.text}"
            raise AssertionError("the study did not complete within 60 s")

    run_clients(worker, errors, start)

    pairs = sorted((t["number"], t["attempt"]) for t in handed)
    abandoned = [0, 4, 8]
    assert pairs == sorted([(n, 1) for n in range(12)] + [(n, 2) for n in abandoned])
    first = {t["number"]: t for t in handed if t["attempt"] == 1}
    for again in (t for t in handed if t["attempt"] == 2):  # the same trial, the same params
        assert again["trial_id"] == first[again["number"]]["trial_id"]
        assert again["params"] == first[again["number"]]["params"]
    with two_servers[1].http() as http:
        study = http.get(f"/api/v1/studies/{study_id}").json()
        assert study["state"] == "completed" and study["n_trials"] == 12
        assert study["counts"]["complete"] == 12
        trials = http.get(f"/api/v1/studies/{study_id}/trials").json()["trials"]
        assert sorted((t["number"], t["attempts"]) for t in trials) == [
            (n, 2 if n in abandoned else 1) for n in range(12)
        ]


def test_concurrency_limit_holds_under_racing_asks(two_servers: list[ServerProcess]) -> None:
    spec = simple_spec("slots", budget={"max_concurrent": 3})
    with two_servers[0].http() as http:
        study_id = http.post("/api/v1/studies", json=spec).json()["id"]
    answers: list[httpx.Response] = []  # list.append is atomic: no lock needed
    errors: list[str] = []
    start = threading.Barrier(CLIENTS, timeout=120)

    def worker(i: int) -> None:
        server = two_servers[i % 2]
        with server.http() as http:
            start.wait()
            answers.append(http.post(f"/api/v1/studies/{study_id}/ask"))

    run_clients(worker, errors, start)
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 3 + [409] * (CLIENTS - 3), [r.text for r in answers]
    refused = [r.json()["message"] for r in answers if r.status_code == 409]
    assert all("max_concurrent" in message for message in refused), refused
    granted = {r.json()["trial_id"] for r in answers if r.status_code == 201}
    assert len(granted) == 3


def test_max_steps_is_never_exceeded_by_racing_reports(two_servers: list[ServerProcess]) -> None:
    """CLIENTS trials on two servers report steps of two points at once until told to stop;
    ``budget.max_steps`` (steps summed over trials) is spent exactly: no point past it is
    stored, none within it is refused, and the study completes saying why."""
    max_steps = 100
    spec = simple_spec("steps-race", budget={"max_trials": CLIENTS, "max_steps": max_steps})
    with two_servers[0].http() as http:
        study_id = http.post("/api/v1/studies", json=spec).json()["id"]
    errors: list[str] = []
    start = threading.Barrier(CLIENTS, timeout=120)

    def worker(i: int) -> None:
        with two_servers[i % 2].http() as http:
            asked = http.post(f"/api/v1/studies/{study_id}/ask")
            if asked.status_code != 201:
                errors.append(f"ask {asked.status_code} {asked.text}")
                start.abort()
                return
            trial = asked.json()
            start.wait()
            for step in range(1, 40, 2):
                points = [{"name": "loss", "step": s, "value": 1.0 / s} for s in (step, step + 1)]
                r = http.post(
                    f"/api/v1/trials/{trial['trial_id']}/metrics", json={"points": points}
                )
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text}")
                    return
                if r.json()["should_stop"]:
                    return
            errors.append(f"trial {trial['trial_id']} was never stopped")

    run_clients(worker, errors, start, timeout=300, daemon=True)
    with two_servers[1].http() as http:
        trials = http.get(f"/api/v1/studies/{study_id}/trials").json()["trials"]
        stored = 0
        for trial in trials:
            points = http.get(f"/api/v1/trials/{trial['id']}/metrics").json()["points"]
            steps = [p["step"] for p in points]
            assert steps == list(range(1, len(steps) + 1)), steps  # none skipped or twice
            # (a trial stopped before it stored a step has no last step)
            assert (trial["last_step"] or 0) == len(steps) and trial["state"] == "pruned"
            stored += len(steps)
        assert stored == max_steps
        study = http.get(f"/api/v1/studies/{study_id}").json()
        assert study["state"] == "completed", study
        assert "budget.max_steps" in study["state_reason"], study


def test_a_page_following_the_trials_cursor_misses_no_point(
    two_servers: list[ServerProcess],
) -> None:
    """CLIENTS trials on two servers stream reports (the median pruner stops the worse half;
    the others' reports only add points and move the curves' cursor) while another client
    asks and tells trials and a page follows ``GET /studies/{id}/trials?since=cursor`` from
    the other server. Once nothing moves, the page's view (each trial's last step and state)
    equals a full read: no change was numbered below a cursor the page had already passed.
    (A missed change shows only when nothing of that trial changes after it: the half that
    is not pruned ends on a report, and its last report's points must be seen.)"""
    spec = simple_spec(
        "cursor-race",
        pruner={"type": "median", "n_startup_trials": 2, "min_steps": 1},
        budget={"max_trials": 200},
    )
    errors: list[str] = []
    with two_servers[0].http() as http:
        study_id = http.post("/api/v1/studies", json=spec).raise_for_status().json()["id"]
        for _ in range(2):  # complete trials: the medians
            asked = http.post(f"/api/v1/studies/{study_id}/ask").raise_for_status()
            tid = asked.json()["trial_id"]
            points = [{"name": "loss", "step": s, "value": 1.0} for s in range(1, 41)]
            http.post(f"/api/v1/trials/{tid}/metrics", json={"points": points}).raise_for_status()
            http.post(f"/api/v1/trials/{tid}/tell", json={"value": 1.0}).raise_for_status()
    done, writers = threading.Event(), threading.Event()
    start = threading.Barrier(CLIENTS + 2, timeout=120)
    told: list[int] = []

    def guarded(body: Callable[..., None]) -> Callable[..., None]:
        """``body`` on a thread: whatever it raises is an error of the test, not lost."""

        def run(*args: object) -> None:
            try:
                body(*args)
            except BaseException as exc:  # reported by the test below
                errors.append(f"{body.__name__}: {exc!r}")
                start.abort()

        return run

    def streamer(i: int) -> None:
        with two_servers[i % 2].http() as http:
            asked = http.post(f"/api/v1/studies/{study_id}/ask")
            if asked.status_code != 201:
                errors.append(f"ask {asked.status_code} {asked.text}")
                start.abort()
                return
            tid = asked.json()["trial_id"]
            start.wait()
            value = 0.5 if i % 2 else 2.0  # odd: better than the median, even: pruned
            for step in range(1, 41, 4):
                points = [
                    {"name": "loss", "step": s, "value": value} for s in range(step, step + 4)
                ]
                r = http.post(f"/api/v1/trials/{tid}/metrics", json={"points": points})
                if r.status_code != 200:
                    errors.append(f"report {r.status_code} {r.text}")
                    return
                if r.json()["should_stop"]:
                    return

    def asker() -> None:  # study-locked writes racing the reports
        with two_servers[0].http() as http:
            start.wait()
            while not done.is_set():
                asked = http.post(f"/api/v1/studies/{study_id}/ask")
                if asked.status_code != 201:
                    errors.append(f"ask {asked.status_code} {asked.text}")
                    return
                tid = asked.json()["trial_id"]
                r = http.post(f"/api/v1/trials/{tid}/tell", json={"value": 1})
                if r.status_code != 200:
                    errors.append(f"tell {r.status_code} {r.text}")
                    return
                told.append(tid)

    seen: dict[int, tuple[int | None, str]] = {}

    def page(http: httpx.Client, cursor: int | None) -> int:
        params = {} if cursor is None else {"since": cursor}
        r = http.get(f"/api/v1/studies/{study_id}/trials", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        for t in body["trials"]:
            seen[t["id"]] = (t["last_step"], t["state"])
        return body["cursor"]

    def poller() -> None:
        with two_servers[1].http() as http:
            cursor = page(http, None)
            start.wait()
            while not done.is_set():
                cursor = page(http, cursor)
            writers.wait()  # then what committed after its last poll
            page(http, cursor)

    streamers = [
        threading.Thread(target=guarded(streamer), args=(i,), daemon=True) for i in range(CLIENTS)
    ]
    others = [
        threading.Thread(target=guarded(asker), daemon=True),
        threading.Thread(target=guarded(poller), daemon=True),
    ]
    for t in streamers + others:
        t.start()
    for t in streamers:
        t.join(timeout=300)
    done.set()
    others[0].join(timeout=120)
    writers.set()
    others[1].join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in streamers + others)
    assert told, "the asker told no trial: nothing raced the reports"
    with two_servers[0].http() as http:
        trials = http.get(f"/api/v1/studies/{study_id}/trials").json()["trials"]
    truth = {t["id"]: (t["last_step"], t["state"]) for t in trials}
    assert seen == truth
    streamed = [v for v in truth.values() if v[1] in ("running", "pruned")]
    assert {state for _, state in streamed} == {"running", "pruned"}, streamed
    assert sum(1 for step, state in streamed if state == "running" and step == 40) == CLIENTS // 2


def test_fixed_asks_and_imports_racing_on_a_grid_leave_no_point_twice_or_unrun(
    two_servers: list[ServerProcess],
) -> None:
    """Plain asks, asks with fixed values and imports race through two servers on a grid:
    trial n is always grid point n (a guess that lost its number is a 422, never stored
    elsewhere), and once the grid is exhausted every point ran exactly once."""
    grid = {"x": {"type": "int", "low": 0, "high": 39}}
    with two_servers[0].http() as http:
        spec = simple_spec("grid-fixed-race", sampler={"type": "grid"}, space=grid)
        study_id = http.post("/api/v1/studies", json=spec).json()["id"]
    codes: list[int] = []
    errors: list[str] = []

    def worker(i: int) -> None:
        with two_servers[i % 2].http() as http:
            for k in range(10):
                guess = (i * 10 + k) // 3  # about where the next number is
                if k % 3 == 0:
                    r = http.post(f"/api/v1/studies/{study_id}/ask")
                elif k % 3 == 1:
                    r = http.post(f"/api/v1/studies/{study_id}/ask", json={"params": {"x": guess}})
                else:
                    row = {"params": {"x": guess}, "value": 1.0}
                    r = http.post(f"/api/v1/studies/{study_id}/trials", json={"trials": [row]})
                codes.append(r.status_code)

    run_clients(worker, errors)
    assert len(codes) == CLIENTS * 10  # every request of every worker answered
    with two_servers[1].http() as http:
        while http.post(f"/api/v1/studies/{study_id}/ask").status_code == 201:
            pass  # the rest of the grid
        trials = http.get(f"/api/v1/studies/{study_id}/trials", params={"limit": 1000}).json()
    assert set(codes) <= {201, 409, 422}, codes
    assert all(t["params"]["x"] == t["number"] for t in trials["trials"]), trials
    assert sorted(t["params"]["x"] for t in trials["trials"]) == list(range(40))


def test_study_user_attrs_merged_through_two_servers_lose_no_key(
    two_servers: list[ServerProcess],
) -> None:
    """Clients merge study user attributes through two servers, each PATCH sent twice (a
    replay), while others edit the budget and teach a define-by-run study new parameters
    (writes of the same stored spec): no key, value, budget or parameter is lost; a NaN is
    refused and stores nothing."""
    with two_servers[0].http() as http:
        spec = simple_spec("attrs-race", space={}, define_by_run=True)
        study_id = http.post("/api/v1/studies", json=spec).json()["id"]
    url = f"/api/v1/studies/{study_id}"
    codes: list[int] = []
    errors: list[str] = []

    def merger(i: int) -> None:
        with two_servers[i % 2].http() as http:
            for k in range(8):
                body = {"user_attrs": {f"c{i}k{k}": i * 100 + k}}
                codes.extend(http.patch(url, json=body).status_code for _ in range(2))

    def learner(i: int) -> None:
        with two_servers[i % 2].http() as http:
            for k in range(4):
                trial = http.post(f"{url}/ask").json()
                param = {"type": "float", "low": 0.0, "high": 1.0}
                r = http.post(
                    f"/api/v1/trials/{trial['trial_id']}/suggest",
                    json={"name": f"p{i}_{k}", "param": param},
                )
                codes.append(r.status_code)
                codes.append(http.patch(url, json={"budget": {"max_trials": 1000 + i}}).status_code)

    threads = [threading.Thread(target=reported(merger, errors), args=(i,)) for i in range(CLIENTS)]
    threads += [threading.Thread(target=reported(learner, errors), args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert len(codes) == CLIENTS * 8 * 2 + 4 * 4 * 2  # every PATCH and suggest answered
    with two_servers[1].http() as http:
        refused = http.patch(  # JSON's extension Infinity, as a careless client sends it
            url,
            content=b'{"user_attrs": {"bad": Infinity}}',
            headers={"Content-Type": "application/json"},
        )
        stored = http.get(url).json()["spec"]
    assert set(codes) <= {200}, sorted(set(codes))
    expected = {f"c{i}k{k}": i * 100 + k for i in range(CLIENTS) for k in range(8)}
    assert stored["user_attrs"] == expected  # none lost, none changed, nothing else added
    assert set(stored["space"]) == {f"p{i}_{k}" for i in range(4) for k in range(4)}
    assert stored["budget"]["max_trials"] in {1000, 1001, 1002, 1003}
    assert refused.status_code == 422, refused.text
