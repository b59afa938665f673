"""HealthWindow: how long the control plane has worked, on a clock the test moves."""

from __future__ import annotations

import time

from hpo.service.health import FREEZE_SLACK_S, HealthWindow


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_window_restarts_when_a_database_outage_ends() -> None:
    clock = Clock()
    health = HealthWindow(clock)
    clock.now += 10
    assert health.healthy_for() == 10
    health.failed()
    clock.now += 6
    assert health.healthy_for() == 0  # still down: no success since
    health.succeeded()
    clock.now += 2
    assert health.healthy_for() == 2
    health.succeeded()  # a success without an outage before it changes nothing
    assert health.healthy_for() == 2


def test_a_late_heartbeat_is_a_freeze_that_restarts_the_window() -> None:
    clock = Clock()
    health = HealthWindow(clock)
    health.beat(0.25)
    clock.now += 0.25 + FREEZE_SLACK_S / 2  # jitter, not a freeze
    assert health.healthy_for() == 0.25 + FREEZE_SLACK_S / 2
    health.beat(0.25)
    assert health.healthy_for() == 0.25 + FREEZE_SLACK_S / 2
    clock.now += 6  # SIGSTOP: until the next beat, whoever asks first sees no healthy time
    assert health.healthy_for() == 0
    health.beat(0.25)  # the beat after the freeze restarts the window
    assert health.healthy_for() == 0
    clock.now += 1
    assert health.healthy_for() == 1


def test_the_heartbeat_thread_beats_until_closed() -> None:
    health = HealthWindow()
    health.watch(0.05)
    try:
        time.sleep(0.5)
        assert health.healthy_for() > 0.4  # beating on time: no freeze seen
    finally:
        health.close()
    time.sleep(0.05 + FREEZE_SLACK_S + 0.2)
    assert health.healthy_for() == 0  # no beat since: a freeze, as far as it can tell
