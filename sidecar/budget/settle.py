"""The background pass that keeps budgets honest between requests: expired reservations
charged their estimate, the fail-open spool replayed once the store is back, and the
open-reservations and budget gauges kept current."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import structlog

from sidecar.budget.spool import Spool
from sidecar.metrics import RESERVATIONS_EXPIRED, RESERVATIONS_OPEN
from sidecar.store.base import Store

log = structlog.get_logger("sidecar")
# Passes between refreshes of the budget gauges (a scrape of a single process refreshes too).
BUDGET_GAUGES_EVERY = 10


class Settler:
    def __init__(
        self,
        store: Store,
        spool: Spool | None,
        refresh_gauges: Callable[[], None],
        *,
        clock: Callable[[], float] = time.time,
        interval: float = 1.0,
    ) -> None:
        self._store = store
        self._spool = spool
        self._refresh_gauges = refresh_gauges
        self._clock = clock
        self._interval = interval

    async def settle_once(self) -> bool:
        """One pass; False when the store failed it (the next pass tries again)."""
        try:
            now = self._clock()
            expired = await self._store.settle_expired(now)
            if expired:
                # A lost metering record ends here (Envoy dropped it, or nobody reported):
                # the reservation's estimate is charged. One line a pass.
                RESERVATIONS_EXPIRED.inc(expired)
                log.warning("reservations_expired_into_estimate", count=expired)
            if self._spool is not None:
                await self._spool.replay(self._store, now)
            RESERVATIONS_OPEN.set(await self._store.open_reservations())
            return True
        except Exception as exc:  # keep the loop alive whatever the store does
            log.warning("settle_failed", error=str(exc))
            return False

    async def run(self) -> None:
        for tick in itertools.count(1):
            await asyncio.sleep(self._interval)
            await self.settle_once()
            if tick % BUDGET_GAUGES_EVERY == 0:
                # Each worker keeps its gauges current itself (under --workers a scrape runs
                # in one worker and reads all their values); a pass goes over every bucket
                # seen, so not every second.
                self._refresh_gauges()
