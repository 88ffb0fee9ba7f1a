"""Calls admitted by a Check whose answer Envoy never acted on.

A Check's answer can be lost after the sidecar admitted the call and reserved for it: the
client hung up while the Check waited in the sidecar's queue, or Envoy's ext_authz timeout
passed first. Envoy then never runs the metering filter for that call, so no record with
the reservation id comes back, and the reservation would expire into its estimate: a
charge for a call that never reached the provider. When the decision is synchronous (a
SQLite file this process owns) gRPC cannot cancel it midway, and its server API does not
say whether an answer was delivered.

Envoy does log such a call (`sidecar envoy-config` sends calls that ended with `DC`, `DR`,
or a slow `UAEX`, to the sidecar as well), without a reservation id, but with the time
Envoy started it and its `x-request-id`, which the CheckRequest carried too. The two name
one call: a client may choose an `x-request-id`, but not the time Envoy stamps on a call.
So every admitted Check is remembered here under that key for a few seconds, and a
logged call without a reservation id that matches one releases it at $0. Either may come
first (Envoy can log a hang-up before the queued Check is decided), so calls logged as gone
are remembered too.

With several sidecar processes (`--workers`, replicas on Redis) a call's log may reach
another process than the one that admitted it: a call logged as gone that matched nothing
there is published in the store for the others (`SharedUnanswered`), which look once a
second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from sidecar.store.base import Store

log = structlog.get_logger("sidecar.metering")

# The time Envoy started the call, "<seconds>.<nanoseconds>", then " " and its
# x-request-id ("" if none). A string, not a tuple: one object per call that the garbage
# collector never has to walk (a tuple per Check, kept for seconds, lengthened its passes).
CallKey = str


def call_key(seconds: int, nanos: int, request_id: str) -> CallKey:
    return f"{seconds}.{nanos} {request_id}"


class Unanswered:
    """Admitted calls and calls logged as gone, each kept for between `horizon` / 2 and
    `horizon` seconds: two generations of each, the older dropped whole when the newer is
    `horizon` / 2 old or holds `max_entries`."""

    def __init__(
        self,
        *,
        horizon: float = 10.0,
        max_entries: int = 50_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Envoy logs a call at most its ext_authz timeout (2 s) plus a flush interval (50 ms)
        # after the Check was sent, and a Check is refused unseen once that timeout passed:
        # 5-10 s leaves room for a slow log stream. Every admitted call is kept that long
        # (its own record needs no look-up here): up to 10,000 at 1,000 calls a second.
        self.horizon = horizon
        self.max_entries = max_entries
        self._clock = clock
        self._admitted: tuple[dict[CallKey, str], dict[CallKey, str]] = ({}, {})
        self._gone: tuple[set[CallKey], set[CallKey]] = (set(), set())
        self._turned = clock()

    def admitted(self, key: CallKey, request_id: str) -> bool:
        """Remember that `key`'s call was admitted under `request_id`; True when Envoy has
        logged that call as gone already (nothing will act on the answer)."""
        self._turn()
        newer, older = self._gone
        if key in newer or key in older:
            newer.discard(key)
            older.discard(key)
            return True
        self._admitted[0][key] = request_id
        return False

    def gone(self, key: CallKey) -> str | None:
        """Envoy logged `key`'s call without a reservation id: the request id it was admitted
        under, if it was (then forgotten), else None (and the call is remembered as gone)."""
        self._turn()
        found = self.take(key)
        if found is None:
            self._gone[0].add(key)
        return found

    def take(self, key: CallKey) -> str | None:
        """The request id `key`'s call was admitted under here (then forgotten), or None;
        unlike `gone`, nothing is remembered of a call not admitted here."""
        newer, older = self._admitted
        return newer.pop(key, None) or older.pop(key, None)

    def __len__(self) -> int:
        return sum(map(len, self._admitted)) + sum(map(len, self._gone))

    def _turn(self) -> None:
        now = self._clock()
        if (
            now - self._turned < self.horizon / 2
            and len(self._admitted[0]) < self.max_entries
            and len(self._gone[0]) < self.max_entries
        ):
            return
        self._turned = now
        self._admitted = ({}, self._admitted[0])
        self._gone = (set(), self._gone[0])


class SharedUnanswered:
    """Calls Envoy logged as gone that no Check of this process admitted, shared through the
    store with the processes that may have (`sidecar serve --workers N`, replicas on Redis):
    Envoy's access log stream and its Checks reach them over different connections. Each
    process looks at what the others published once a second (`match_once`) and releases the
    calls it admitted among them. A SQLite file one process owns has no other process: this
    is not used there."""

    COLLECTION = "unanswered-calls"

    def __init__(
        self,
        local: Unanswered,
        store: Store,
        withdraw: Callable[[str], Awaitable[None]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._local = local
        self._store = store
        self._withdraw = withdraw
        self._clock = clock
        # As long as a call is kept here (Unanswered.horizon).
        self.ttl_seconds = int(local.horizon)

    async def publish(self, key: CallKey) -> None:
        await self._store.put_doc(
            self.COLLECTION, key, {"call": key}, self.ttl_seconds, now=self._clock()
        )

    async def match_once(self) -> int:
        """Release the calls this process admitted among those published; how many."""
        released = 0
        for doc in await self._store.list_docs(self.COLLECTION, now=self._clock()):
            key = doc.get("call")
            if not isinstance(key, str):
                continue
            request_id = self._local.take(key)
            if request_id is None:
                continue
            log.info("unanswered_call_released", request_id=request_id, via="store")
            await self._withdraw(request_id)
            await self._store.delete_doc(self.COLLECTION, key)
            released += 1
        return released

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.match_once()
            except Exception as exc:  # the next pass tries again
                log.warning("unanswered_match_failed", error=str(exc))
