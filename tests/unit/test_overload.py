"""Load shedding: which Checks are refused at once, and that refusing is cheap and quiet."""

from __future__ import annotations

import json
from pathlib import Path

from structlog.testing import capture_logs

from sidecar.overload import LoadShedder
from sidecar.store.sqlite_store import SQLiteStore
from tests.unit.test_engine import attrs, config, engine


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_checks_beyond_max_inflight_are_shed() -> None:
    shedder = LoadShedder(max_inflight=2, max_loop_lag=1.0)
    with shedder.deciding(None), shedder.deciding(None):
        assert shedder.shed(None) == "queue_full"
    assert shedder.inflight == 0 and shedder.shed(None) is None


def test_check_that_cannot_meet_its_deadline_is_shed() -> None:
    clock = Clock()
    shedder = LoadShedder(max_inflight=100, max_loop_lag=1.0, clock=clock)
    for _ in range(200):  # Checks have been taking 20 ms each
        with shedder.deciding(2.0):
            clock.now += 0.020
    assert abs(shedder.check_seconds - 0.020) < 0.001
    assert shedder.shed(0.005) == "deadline"
    assert shedder.shed(0.5) is None
    assert shedder.shed(None) is None  # no deadline, nothing to miss


def test_a_late_event_loop_sheds_until_it_catches_up() -> None:
    shedder = LoadShedder(max_inflight=100, max_loop_lag=0.25)
    shedder.loop_lag = 0.4
    assert shedder.shed(2.0) == "loop_lag"
    shedder.loop_lag = 0.01
    assert shedder.shed(2.0) is None


def test_overload_is_logged_once_a_second_with_counts() -> None:
    clock = Clock()
    shedder = LoadShedder(max_inflight=1, max_loop_lag=1.0, clock=clock)
    with capture_logs() as logs, shedder.deciding(None):
        for _ in range(50):
            shedder.shed(None)
        clock.now += 0.5
        for _ in range(50):
            shedder.shed(None)
        clock.now += 0.6
        shedder.shed(None)
    lines = [e for e in logs if e["event"] == "overloaded"]
    # The first refusal opens a line; the next comes a second later with what it held.
    assert [line["shed"] for line in lines] == [{"queue_full": 1}, {"queue_full": 100}]


async def test_engine_answers_shed_checks_503_without_touching_the_store(tmp_path: Path) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path}/o.db")
    try:
        eng = engine(config(overload={"max_inflight": 1}), store)
        with eng.shedder.deciding(None):  # one Check already being decided
            decision = await eng.check(attrs("cent-a", "r1"))
        assert (decision.allowed, decision.http_status) == (False, 503)
        assert decision.headers["retry-after"] == "1"
        body = json.loads(decision.body)
        assert body["success"] is False and body["error"]["type"] == "overloaded"
        assert await store.reservation(decision.request_id) is None
        assert (await eng.check(attrs("cent-a", "r2"))).allowed  # capacity back: decided
    finally:
        await store.close()
