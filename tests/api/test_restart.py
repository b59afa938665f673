"""Killing the server mid-study loses nothing: the next one continues where it stopped."""

from __future__ import annotations

from tests.conftest import ServerProcess, simple_spec


def test_server_restart_mid_study_keeps_state(server: ServerProcess) -> None:
    client = server.client()
    study = client.create_study(
        simple_spec("restart", sampler={"type": "tpe", "seed": 3}, budget={"max_trials": 6})
    )
    finished = []
    for _ in range(3):
        t = study.ask()
        study.report(t, step=0, metrics={"loss": 5.0})
        study.tell(t, value=t.params["x"] ** 2)
        finished.append(t.trial_id)
    running = study.ask()
    study.report(running, step=0, metrics={"loss": 2.0})
    client.close()

    server.restart()  # SIGKILL, then a new process on the same database

    client = server.client()
    study = client.study(study.id)
    record = study.refresh()
    assert record.counts["complete"] == 3 and record.counts["running"] == 1
    assert record.best_trial.value == min(t.value for t in study.trials(state="complete"))
    # the trial that was running can still report and be told
    assert study.report(running, step=1, metrics={"loss": 1.0}) is False
    study.tell(running, value=1.0)
    assert [p.step for p in study.metrics(running)] == [0, 1]
    numbers = [study.ask().number for _ in range(2)]
    assert numbers == [4, 5]
    assert {t.number for t in study.trials()} == set(range(6))
