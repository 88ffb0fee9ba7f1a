"""Calls this process admitted whose charge has not come back yet (for a graceful drain).

Through Envoy a call is charged from its access-log record, which arrives after the call
ends: a sidecar asked to stop keeps its gRPC server up until the calls it admitted have
been charged (or a deadline passes), so those records are not lost to the restart. A
record that never comes here (sent to another replica, or lost) is forgotten after
`max_age` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class InFlight:
    def __init__(
        self,
        *,
        max_age: float = 600.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age = max_age
        self.max_entries = max_entries
        self._clock = clock
        # Insertion order is admission order: the oldest entries are always at the front.
        self._admitted: dict[str, float] = {}
        # Admission times to the second below, one float object for the calls of each
        # second (a float each was 24 bytes of every call in flight, up to `max_entries` of
        # them); a call is then forgotten up to a second before `max_age`.
        self._second = -1.0

    def admitted(self, request_id: str) -> None:
        now = self._clock()
        second = self._second
        if not second <= now < second + 1.0:
            second = self._second = float(int(now))
        self._admitted[request_id] = second
        if len(self._admitted) > self.max_entries:
            self._forget_old(now)

    def charged(self, request_id: str) -> None:
        self._admitted.pop(request_id, None)

    def count(self) -> int:
        self._forget_old(self._clock())
        return len(self._admitted)

    def _forget_old(self, now: float) -> None:
        admitted = self._admitted
        while admitted:
            oldest = next(iter(admitted))
            if now - admitted[oldest] <= self.max_age and len(admitted) <= self.max_entries:
                return
            del admitted[oldest]
