"""Calls Envoy logged as gone, shared between sidecar processes through the store
(sidecar/envoy/unanswered.py `SharedUnanswered`): the process that admitted a call releases
it once, whichever process Envoy's access log reached; others' calls are left alone."""

from __future__ import annotations

from sidecar.envoy.unanswered import SharedUnanswered, Unanswered, call_key
from sidecar.store.base import Store
from tests.support.store_clock import StoreClock

GONE = call_key(1_796_000_000, 42_000, "left-early")
OTHER = call_key(1_796_000_000, 43_000, "still-here")


class Process:
    """One sidecar process's part: its admitted calls, and the releases it made."""

    def __init__(self, store: Store, now: float) -> None:
        self.local = Unanswered()
        self.released: list[str] = []
        self.shared = SharedUnanswered(self.local, store, self._withdraw, clock=lambda: now)

    async def _withdraw(self, request_id: str) -> None:
        self.released.append(request_id)


async def test_a_call_logged_gone_in_one_process_is_released_by_the_one_that_admitted_it(
    store: Store, store_clock: StoreClock
) -> None:
    now = store_clock()
    admitting, logging = Process(store, now), Process(store, now)
    admitting.local.admitted(GONE, "r-gone")
    admitting.local.admitted(OTHER, "r-other")

    # The access log reached the other process: nothing admitted there, so it publishes.
    assert logging.local.gone(GONE) is None
    await logging.shared.publish(GONE)

    assert await logging.shared.match_once() == 0
    assert await admitting.shared.match_once() == 1
    assert admitting.released == ["r-gone"]
    # Released once: the published call is gone from the store, the other call is kept.
    assert await admitting.shared.match_once() == 0
    assert admitting.released == ["r-gone"]
    assert admitting.local.take(OTHER) == "r-other"


async def test_a_published_call_expires_with_the_horizon(
    store: Store, store_clock: StoreClock
) -> None:
    publisher = Process(store, store_clock())
    await publisher.shared.publish(GONE)
    later = Process(store, store_clock() + publisher.shared.ttl_seconds + 1)
    later.local.admitted(GONE, "r-late")
    assert await later.shared.match_once() == 0
    assert later.released == []
