"""Verification keys by kid, held in memory: reloaded once older than their maximum age,
and on an unknown kid at most once per floor, so forged kids cannot hammer the source; a
reload that fails keeps the last good keys, so a blip of the source (an IdP, the store)
does not log everyone out. Serves the JWT issuers' JWKS and the sidecar's own keys."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

Keys = dict[str, Any]


class KeySource(Protocol):
    async def load_keys(self, now: float) -> Keys: ...

    # Hear of each reload's outcome (logs, counters), the keys still the old ones when
    # `keys_failed` runs.
    def keys_loaded(self, keys: Keys) -> None: ...

    def keys_failed(self, exc: Exception) -> None: ...


class KeyCache:
    def __init__(
        self, source: KeySource, *, clock: Callable[[], float], floor: float, max_age: float
    ) -> None:
        self._source = source
        self._clock = clock
        self._floor = floor
        self._max_age = max_age
        self.keys: Keys = {}
        self.loaded_at: float | None = None
        self._last_attempt: float | None = None
        self._lock = asyncio.Lock()

    def stale(self) -> bool:
        return self.loaded_at is None or self._clock() - self.loaded_at > self._max_age

    def expire(self) -> None:
        """The next lookup reloads (the keys changed here)."""
        self.loaded_at = None

    async def reload(self, *, force: bool) -> None:
        """Load the keys, unless not `force`d and the last attempt is within the floor."""
        async with self._lock:
            now = self._clock()
            if (
                not force
                and self._last_attempt is not None
                and now - self._last_attempt < self._floor
            ):
                return
            self._last_attempt = now
            try:
                keys = await self._source.load_keys(now)
            except Exception as exc:
                self._source.keys_failed(exc)
                return
            self.keys = keys
            self.loaded_at = now
            self._source.keys_loaded(keys)
