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

Only within one process: with several sidecar processes (`--workers`, replicas) a call's
log may reach another one, and its reservation then expires into its estimate as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
        newer, older = self._admitted
        found = newer.pop(key, None) or older.pop(key, None)
        if found is None:
            self._gone[0].add(key)
        return found

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
