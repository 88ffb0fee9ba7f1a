"""Verification keys by kid, held in memory: reloaded once older than their maximum age,
and on an unknown kid at most once per floor, so forged kids cannot hammer the source; a
reload that fails keeps the last good keys, so a blip of the source (an IdP, the store)
does not log everyone out. Serves the JWT issuers' JWKS and the sidecar's own keys."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Keys = dict[str, Any]


class KeyCache:
    def __init__(
        self,
        load: Callable[[float], Awaitable[Keys]],
        *,
        clock: Callable[[], float],
        floor: float,
        max_age: float,
        loaded: Callable[[Keys], None],
        failed: Callable[[Exception], None],
    ) -> None:
        # `loaded` and `failed` hear of each reload's outcome (logs, counters), the keys
        # still the old ones when `failed` runs.
        self._load = load
        self._clock = clock
        self._floor = floor
        self._max_age = max_age
        self._loaded = loaded
        self._failed = failed
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
                keys = await self._load(now)
            except Exception as exc:
                self._failed(exc)
                return
            self.keys = keys
            self.loaded_at = now
            self._loaded(keys)
