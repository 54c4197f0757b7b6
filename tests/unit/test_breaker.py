"""The circuit breaker's states: closed, open on failures, half-open after the cool-down."""

from gateway.breaker import Breakers, BreakerState


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_failures_in_a_row() -> None:
    breakers = Breakers(threshold=3, cooldown=5, clock=Clock())
    b = breakers["w"]
    b.record_failure()
    b.record_failure()
    assert b.allows()
    b.record_failure()
    assert b.state is BreakerState.OPEN and not breakers.allows("w")


def test_a_success_resets_the_count() -> None:
    b = Breakers(threshold=2, cooldown=5, clock=Clock())["w"]
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert b.state is BreakerState.CLOSED


def test_connection_refused_opens_at_once() -> None:
    b = Breakers(threshold=10, cooldown=5, clock=Clock())["w"]
    b.record_failure(fatal=True)
    assert b.state is BreakerState.OPEN


def test_half_open_lets_one_trial_through_then_closes_or_reopens() -> None:
    clock = Clock()
    b = Breakers(threshold=1, cooldown=5, clock=clock)["w"]
    b.record_failure()
    clock.now = 5.0
    assert b.state is BreakerState.HALF_OPEN and b.allows()
    b.acquire()
    assert not b.allows()  # only one trial at a time
    b.record_failure()
    assert b.state is BreakerState.OPEN
    clock.now = 10.0
    b.acquire()
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allows()


def test_unknown_workers_are_allowed_and_departed_ones_forgotten() -> None:
    breakers = Breakers(clock=Clock())
    assert breakers.allows("new")
    breakers["old"].record_failure(fatal=True)
    breakers.forget({"new"})
    assert breakers.allows("old") and breakers.states() == {}
