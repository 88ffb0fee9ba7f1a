"""The clock of a document-store test, for every backend."""

from __future__ import annotations

from tests.support.redis_admin import age_redis


class StoreClock:
    """The `now` a test passes to the store. `advance` moves it and, on Redis, which expires
    documents and counters on its own clock, ages the keys by as much: expiry is tested at
    the boundary the TTL sets, never by waiting for it."""

    def __init__(self, start: float, redis_url: str | None) -> None:
        self._now = start
        self._redis_url = redis_url

    def __call__(self) -> float:
        return self._now

    async def advance(self, seconds: float) -> None:
        self._now += seconds
        if self._redis_url is not None:
            await age_redis(self._redis_url, seconds)
