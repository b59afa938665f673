"""Promotion ASHA on a real local Ray with DDP world size 2 (gloo): a trial pauses at its rung
(every rank stops at the same step, the checkpoint is saved, its placement group goes back to
the pool) and, once promoted, resumes from that checkpoint as a new attempt of the same trial,
its curve continuing where it paused. The control plane is killed (SIGKILL) while a trial is
paused, and again in a PBT study once a trial paused to copy another; after the restart each
study finishes as it would have."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.service.test_dispatch import fast_and_slow, finished, pbt_pair, start_server, synthetic

pytestmark = pytest.mark.ray


def killed_and_restarted_at(server: Any, study: Any, event: str) -> tuple[Any, Any]:
    """SIGKILL the control plane as soon as some trial of ``study`` records an event whose
    detail starts with ``event``, start it again, and return its new client and the study."""
    client = server.client()

    def happened() -> bool:
        return any(
            (e.detail or "").startswith(event)
            for t in study.trials()
            for e in client.trial(t.id).events
        )

    wait_for(happened, 180, f"an event {event!r}")
    server.kill()
    server.start()
    client = server.client()
    return client, client.study(study.id)


def test_paused_ddp_trial_is_promoted_and_resumes_from_its_checkpoint_after_a_restart(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path)
    try:
        client = server.client()
        study = client.create_study(
            synthetic(
                "promote",
                budget={"max_trials": 2, "max_concurrent": 1},
                pruner={
                    "type": "asha",
                    "mode": "promotion",
                    "min_steps": 2,
                    "reduction_factor": 2,
                    "max_steps": 4,
                },
                trainable={"name": "synthetic", "config": {"steps": 4, "step_s": 0.2}},
            )
        )
        first = wait_for(lambda: study.trials(state="paused"), 180, "a paused trial")[0]
        server.kill()  # SIGKILL the control plane (and its local Ray) while it is paused
        server.start()
        client = server.client()
        study = client.study(study.id)
        finished(study, timeout=180)
        trials = {t.number: client.trial(t.id) for t in study.trials()}
        assert sorted(trials) == [0, 1] and study.record.counts["paused"] == 0
        done = next(t for t in trials.values() if t.state == "complete")
        other = next(t for t in trials.values() if t.state != "complete")
        assert other.state == "pruned" and other.last_step == 2
        # the winner paused at step 2 and was promoted: a new attempt, not a retry
        states = [e.state for e in done.events]
        assert "paused" in states and states.index("paused") < states.index("complete")
        (promoted,) = [e for e in done.events if "promoted" in (e.detail or "")]
        assert promoted.state == "waiting" and "rank 1 of 2" in promoted.detail
        # The only retry allowed is the restart's: the second trial may have been running when
        # the control plane was killed (an infrastructure loss, retried without cost).
        retries = [e.detail for e in done.events if "retrying" in (e.detail or "")]
        assert all("[infrastructure]" in r and "restarted" in r for r in retries), retries
        # its curve continues: steps 1-4 once each, 1 and 2 from the attempts before the
        # promotion (the one that paused, or one the restart cut short and the retry that
        # resumed it), 3 and 4 from the promoted one
        points = study.metrics(done.id, "loss")
        assert [p.step for p in points] == [1, 2, 3, 4]
        resumed = {p.step: p.attempt for p in points}
        before = promoted.attempt - 1
        assert before - len(retries) <= resumed[1] <= resumed[2] <= before, (resumed, retries)
        assert resumed[3] == resumed[4] == promoted.attempt == done.attempts
        assert [round(p.value, 6) for p in points] == sorted(
            (round(p.value, 6) for p in points), reverse=True
        )
        assert done.placement["world_size"] == 2 and done.placement["attempt"] == done.attempts
        assert first.id in {done.id, other.id}
    finally:
        server.stop()


def test_pbt_study_killed_as_a_trial_pauses_to_copy_finishes_after_a_restart(
    tmp_path: Path,
) -> None:
    """SIGKILL of the control plane as soon as the slow trial paused to copy the fast one
    (the copy may be made or not, the promotion committed or not): after the restart it
    copies and goes on, every step it trained is stored once, the steps it copied are not
    trained, and it ends with the copied weight."""
    server = start_server(tmp_path)
    try:
        study = server.client().create_study(pbt_pair("pbt-restart"))
        client, study = killed_and_restarted_at(server, study, "pbt exploit: paused")
        finished(study, timeout=180)
        fast, slow = (client.trial(t.id) for t in fast_and_slow(study))
        assert (fast.state, slow.state) == ("complete", "complete")
        assert study.record.counts["paused"] == 0
        # its copies (a promotion decided again after the restart may first have resumed
        # its own checkpoint: a segment without a parent)
        copied = [s for s in slow.schedule if s.parent]
        assert copied and all(s.parent.number == fast.number for s in copied)
        for trial in (fast, slow):
            steps = [p.step for p in study.metrics(trial.id, "loss")]
            assert len(steps) == len(set(steps)), steps  # none stored twice
            assert trial.last_step == 12 and trial.last_step - trial.steps_copied == len(steps)
        assert slow.value < 0.05  # the copied weight: its own gets 0.46 at most
    finally:
        server.stop()


def test_replay_study_killed_while_its_trial_pauses_for_a_segment_finishes_after_a_restart(
    tmp_path: Path,
) -> None:
    """SIGKILL of the control plane as soon as a replayed trial paused for its schedule's next
    segment (the retune committed or not): after the restart it resumes once with that
    segment's rate and ends as the schedule says; no step stored twice or lost, and the
    schedule holds the change once."""
    space = {"lr": {"type": "float", "low": 0.001, "high": 0.5, "log": True, "mutable": True}}
    schedule = [{"step": 0, "params": {"lr": 0.16}}, {"step": 4, "params": {"lr": 0.05}}]
    spec = synthetic(
        "replay-restart",
        trainable={"name": "synthetic", "config": {"steps": 10, "x": 0.3, "step_s": 0.25}},
        scheduler={"type": "replay", "schedule": schedule},
        space=space,
    )
    server = start_server(tmp_path)
    try:
        study = server.client().create_study(spec)
        client, study = killed_and_restarted_at(server, study, "replay: paused")
        finished(study, timeout=180)
        (trial,) = (client.trial(t.id) for t in study.trials())
        assert trial.state == "complete" and study.record.n_trials == 1
        assert [(s.step, s.params["lr"]) for s in trial.schedule] == [(0, 0.16), (4, 0.05)]
        steps = [p.step for p in study.metrics(trial.id, "loss")]
        assert steps == list(range(1, 11)), steps  # none lost, none stored twice
        w = 1.0  # the weight the synthetic trainable trains: 0.16 to step 4, then 0.05
        for step in range(1, 11):
            w -= (0.16 if step <= 4 else 0.05) * 2 * (w - 0.3)
        assert trial.value == pytest.approx((w - 0.3) ** 2 + 0.0005, rel=1e-6)
    finally:
        server.stop()
