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
So every admitted Check is remembered here under that key for `horizon` seconds, and a
logged call without a reservation id that matches one releases it at $0. Either may come
first (Envoy can log a hang-up before the queued Check is decided), so calls logged as gone
are remembered too.

Only within one process: with several sidecar processes (`--workers`, replicas) a call's
log may reach another one, and its reservation then expires into its estimate as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# The time Envoy started the call (seconds, nanoseconds) and its x-request-id ("" if none).
CallKey = tuple[int, int, str]


class Unanswered:
    def __init__(
        self,
        *,
        horizon: float = 10.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Envoy logs a call at most its ext_authz timeout (2 s) plus a flush interval (50 ms)
        # after the Check was sent, and a Check is refused unseen once that timeout passed:
        # 10 s leaves room for a slow log stream. Every admitted call is kept that long (its
        # own record needs no look-up here): about 10,000 entries at 1,000 calls a second.
        self.horizon = horizon
        self.max_entries = max_entries
        self._clock = clock
        # Insertion order is arrival order: the oldest entries are at the front.
        self._admitted: dict[CallKey, tuple[str, float]] = {}
        self._gone: dict[CallKey, tuple[str, float]] = {}

    def admitted(self, key: CallKey, request_id: str) -> bool:
        """Remember that `key`'s call was admitted under `request_id`; True when Envoy has
        logged that call as gone already (nothing will act on the answer)."""
        now = self._clock()
        if self._gone.pop(key, None) is not None:
            return True
        self._admitted[key] = (request_id, now)
        self._forget_old(self._admitted, now)
        return False

    def gone(self, key: CallKey) -> str | None:
        """Envoy logged `key`'s call without a reservation id: the request id it was admitted
        under, if it was (then forgotten), else None (and the call is remembered as gone)."""
        now = self._clock()
        found = self._admitted.pop(key, None)
        if found is not None:
            return found[0]
        self._gone[key] = ("", now)
        self._forget_old(self._gone, now)
        return None

    def __len__(self) -> int:
        return len(self._admitted) + len(self._gone)

    def _forget_old(self, entries: dict[CallKey, tuple[str, float]], now: float) -> None:
        while entries:
            oldest = next(iter(entries))
            if now - entries[oldest][1] <= self.horizon and len(entries) <= self.max_entries:
                return
            del entries[oldest]
