"""Admitted calls not charged yet: what a graceful stop waits for, forgotten when too old."""

from __future__ import annotations

from sidecar.metering.inflight import InFlight


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_admitted_until_charged() -> None:
    inflight = InFlight(clock=Clock())
    inflight.admitted("a")
    inflight.admitted("b")
    inflight.charged("a")
    inflight.charged("never-admitted-here")  # another replica's: no effect
    assert inflight.count() == 1


def test_records_that_never_come_are_forgotten_after_max_age() -> None:
    clock = Clock()
    inflight = InFlight(max_age=10, clock=clock)
    inflight.admitted("lost")
    clock.now += 5
    inflight.admitted("recent")
    clock.now += 6
    assert inflight.count() == 1


def test_size_is_bounded_by_dropping_the_oldest() -> None:
    inflight = InFlight(max_entries=3, clock=Clock())
    for name in "abcde":
        inflight.admitted(name)
    inflight.charged("e")
    assert inflight.count() == 2  # c and d: a and b made room


def test_calls_admitted_in_one_second_share_one_admission_time() -> None:
    clock = Clock()
    inflight = InFlight(max_age=10, clock=clock)
    for name, now in (("a", 100.2), ("b", 100.9), ("c", 101.0)):
        clock.now = now
        inflight.admitted(name)
    times = inflight._admitted
    assert times["a"] is times["b"] and times["a"] == 100.0 and times["c"] == 101.0
    clock.now = 110.5  # a and b admitted in second 100: 10.5 > max_age since it began
    assert inflight.count() == 1
