"""HealthWindow: how long the control plane has worked, on a clock the test moves."""

from __future__ import annotations

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


def test_an_overrun_sleep_is_a_freeze_that_restarts_the_window() -> None:
    clock = Clock()
    health = HealthWindow(clock)
    with health.nap(0.5):
        clock.now += 0.5 + FREEZE_SLACK_S / 2  # jitter, not a freeze
    assert health.healthy_for() == 0.5 + FREEZE_SLACK_S / 2
    with health.nap(0.5):
        clock.now += 6  # SIGSTOP: while the sleep has overrun, nothing is healthy
        assert health.healthy_for() == 0
    assert health.healthy_for() == 0
    clock.now += 1
    assert health.healthy_for() == 1
