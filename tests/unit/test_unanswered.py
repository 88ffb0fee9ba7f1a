"""Admitted calls whose answer Envoy never acted on, matched with what Envoy logs of them
(sidecar/envoy/unanswered.py): whichever of the two arrives first, a call is released once;
anything else is left alone."""

from __future__ import annotations

from typing import Any, cast

from envoy.data.accesslog.v3 import accesslog_pb2

from sidecar.engine import Engine
from sidecar.envoy.access_log import AccessLogServicer, gone_call
from sidecar.envoy.unanswered import Unanswered, call_key
from tests.unit.test_access_log import FakeEngine, deliver, entry

STARTED = (1_796_000_000, 123_456_000)
CALL = call_key(*STARTED, "0f0e-call")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_call_admitted_then_logged_gone_is_released_once() -> None:
    calls = Unanswered()
    assert calls.admitted(CALL, "r-1") is False
    assert calls.gone(CALL) == "r-1"
    # Envoy logs a call once; a second entry for it finds nothing to release again.
    assert calls.gone(CALL) is None


def test_a_call_logged_gone_before_its_check_was_decided_is_refused_when_admitted() -> None:
    calls = Unanswered()
    assert calls.gone(CALL) is None
    assert calls.admitted(CALL, "r-1") is True
    assert len(calls) == 0


def test_other_calls_are_left_alone() -> None:
    calls = Unanswered()
    calls.admitted(CALL, "r-1")
    # Same id, another start (a client may reuse an x-request-id; Envoy's time it cannot).
    assert calls.gone(call_key(STARTED[0], STARTED[1] + 1000, "0f0e-call")) is None
    assert calls.gone(call_key(*STARTED, "another")) is None
    assert calls.gone(CALL) == "r-1"


def test_calls_are_kept_between_half_the_horizon_and_the_horizon() -> None:
    clock = Clock()
    calls = Unanswered(horizon=10.0, clock=clock)
    calls.admitted(CALL, "r-1")
    calls.gone("1.0 gone-early")
    clock.now += 6  # past half the horizon: what is kept becomes the older generation
    calls.admitted("2.0 new", "r-2")
    assert calls.admitted("1.0 gone-early", "r-3") is True  # still known as gone
    clock.now += 6  # the older generation, now over the horizon, is dropped whole
    calls.gone("3.0 other")
    assert calls.gone(CALL) is None
    assert calls.gone("2.0 new") == "r-2"


def test_memory_is_bounded_by_max_entries() -> None:
    calls = Unanswered(max_entries=3)
    for n in range(10):
        calls.admitted(f"{n}.0 ", f"r-{n}")
        calls.gone(f"{100 + n}.0 ")
    assert len(calls) <= 12  # two generations of each, at most max_entries apiece
    # The newest are kept.
    assert calls.gone("9.0 ") == "r-9"


def logged_gone(start: tuple[int, int], request_id: str) -> accesslog_pb2.HTTPAccessLogEntry:
    """An entry as Envoy logs a call that ended before the metering filter ran (DC)."""
    out = accesslog_pb2.HTTPAccessLogEntry()
    out.common_properties.start_time.seconds, out.common_properties.start_time.nanos = start
    out.request.request_id = request_id
    out.common_properties.response_flags.downstream_connection_termination = True
    return out


class WithdrawingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.withdrawn: list[str] = []

    async def withdraw(self, request_id: str) -> None:
        self.withdrawn.append(request_id)


def test_a_logged_hang_up_releases_the_call_its_check_admitted() -> None:
    engine = WithdrawingEngine()
    calls = Unanswered()
    calls.admitted(CALL, "r-1")
    calls.admitted(call_key(STARTED[0], STARTED[1] + 1, "other"), "r-2")
    servicer = AccessLogServicer(cast(Engine, engine), calls)

    deliver(servicer, logged_gone(STARTED, "0f0e-call"), entry(rid="r-3"))

    assert engine.withdrawn == ["r-1"]
    assert [rid for rid, _, _ in engine.charges] == ["r-3"]  # records still charged
    assert calls.gone(call_key(STARTED[0], STARTED[1] + 1, "other")) == "r-2"  # untouched


def test_an_entry_with_a_reservation_is_never_read_as_a_hang_up() -> None:
    admitted = entry(rid="r-1")
    admitted.common_properties.start_time.seconds = STARTED[0]
    admitted.common_properties.start_time.nanos = STARTED[1]
    admitted.request.request_id = "0f0e-call"
    assert gone_call(admitted) is None
    assert gone_call(logged_gone(STARTED, "0f0e-call")) == CALL
    assert gone_call(logged_gone((0, 0), "0f0e-call")) is None  # no start: nothing to match


class Published:
    """What the access log servicer publishes for the other processes."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    async def publish(self, key: str) -> None:
        self.keys.append(key)


def test_a_hang_up_matching_nothing_here_is_published_for_the_other_processes() -> None:
    engine = WithdrawingEngine()
    calls = Unanswered()
    calls.admitted(CALL, "r-1")
    published = Published()
    servicer = AccessLogServicer(cast(Engine, engine), calls, cast(Any, published))

    elsewhere = call_key(STARTED[0], STARTED[1] + 1, "admitted-elsewhere")
    deliver(
        servicer,
        logged_gone(STARTED, "0f0e-call"),
        logged_gone((STARTED[0], STARTED[1] + 1), "admitted-elsewhere"),
        entry(rid="r-3"),
    )

    assert engine.withdrawn == ["r-1"]  # matched here: released here, not published
    assert published.keys == [elsewhere]
