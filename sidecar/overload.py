"""Load shedding on the decision path: past capacity, refuse at once with 503 + Retry-After
rather than let a Check outlive Envoy's deadline (which Envoy would turn into its own error
answer after the client has already waited for it).

A Check is shed, before any identity or store work, when

- `queue_full`: more Checks are in flight in this process than `overload.max_inflight`
  (the bound on everything a decision holds: store operations, JWKS waits, memory);
- `deadline`: the caller's deadline (the gRPC deadline Envoy sends) leaves less time than
  a Check has recently taken (an exponentially weighted average of answered Checks);
- `loop_lag`: the event loop is running late by more than `overload.max_loop_lag`, so even
  a fast decision would be answered late.

Shedding costs a few microseconds, so the process keeps answering at its capacity however
many arrive: shed requests get a prompt, retryable answer, admitted ones complete. The
`overloaded` decision is logged once per second at most, with counts by reason, not once
per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Literal

import structlog

from sidecar.metrics import (
    CHECK_HEADROOM_SECONDS,
    CHECKS_INFLIGHT,
    LOOP_LAG_SECONDS,
    SHED,
    observer,
)

log = structlog.get_logger("sidecar.overload")

ShedReason = Literal["queue_full", "deadline", "loop_lag"]
# How often the event loop's lateness is sampled.
LAG_SAMPLE_SECONDS = 0.05
# Weight of the newest Check in the running average of Check time.
_EWMA_WEIGHT = 0.05
_observe_headroom = observer(CHECK_HEADROOM_SECONDS)


class LoadShedder:
    def __init__(
        self, max_inflight: int, max_loop_lag: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_inflight = max_inflight
        self.max_loop_lag = max_loop_lag
        self._clock = clock
        self.inflight = 0
        # Seconds a Check has recently taken; starts optimistic, learns within a few dozen.
        self.check_seconds = 0.001
        self.loop_lag = 0.0
        self._shed_since_log: dict[ShedReason, int] = {}
        self._last_log = 0.0

    def shed(self, time_remaining: float | None) -> ShedReason | None:
        """Why a Check arriving now must be refused at once, or None to decide it."""
        reason: ShedReason | None = None
        if self.inflight >= self.max_inflight:
            reason = "queue_full"
        elif self.loop_lag > self.max_loop_lag:
            reason = "loop_lag"
        elif time_remaining is not None and time_remaining < self.check_seconds:
            reason = "deadline"
        if reason is not None:
            SHED.labels(reason).inc()
            self._note(reason)
        return reason

    @contextlib.contextmanager
    def deciding(self, time_remaining: float | None) -> Iterator[None]:
        """Count a Check in flight and learn how long Checks take."""
        started = self.begin()
        try:
            yield
        finally:
            self.end(started, time_remaining)

    def begin(self) -> float:
        """A Check starts being decided: `deciding` without the context manager (the Check
        path calls these two directly). Returns what `end` is given."""
        self.inflight += 1
        return self._clock()

    def end(self, started: float, time_remaining: float | None) -> None:
        """The Check `begin` returned `started` for is decided."""
        self.inflight -= 1
        took = self._clock() - started
        self.check_seconds += (took - self.check_seconds) * _EWMA_WEIGHT
        if time_remaining is not None:
            _observe_headroom(max(time_remaining - took, 0.0))

    def export(self) -> None:
        """The in-flight gauge set from the count: at every scrape and every loop-lag sample
        (a worker's file under --workers is then at most that old), instead of a locked
        increment and decrement per Check."""
        CHECKS_INFLIGHT.set(self.inflight)

    def _note(self, reason: ShedReason) -> None:
        self._shed_since_log[reason] = self._shed_since_log.get(reason, 0) + 1
        now = self._clock()
        if now - self._last_log >= 1.0:
            log.warning(
                "overloaded",
                shed=dict(self._shed_since_log),
                inflight=self.inflight,
                check_ms=round(self.check_seconds * 1000, 3),
                loop_lag_ms=round(self.loop_lag * 1000, 3),
            )
            self._shed_since_log.clear()
            self._last_log = now

    async def watch_loop(self) -> None:
        """Sample how late the event loop runs (a task for the process's lifetime)."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_SAMPLE_SECONDS)
            late = loop.time() - before - LAG_SAMPLE_SECONDS
            # Recover as fast as lateness builds: one on-time sample clears it.
            self.loop_lag = max(late, 0.0)
            LOOP_LAG_SECONDS.set(self.loop_lag)
            self.export()
