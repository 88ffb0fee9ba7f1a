"""Redis-only parts of document and counter expiry: expiry follows the caller's `now`
while Redis's TTL stays as garbage collection, and documents written before expiries were
stored with them are still read."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from sidecar.store.redis_keys import redis_key
from sidecar.store.redis_store import RedisStore
from tests.support.redis_admin import flush_redis

NOW = 1_800_000_000.0
PREFIX = "docexp:"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[tuple[RedisStore, Redis]]:
    await flush_redis(redis_url)
    store = RedisStore(redis_url, prefix=PREFIX)
    raw = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield store, raw
    finally:
        await raw.aclose()
        await store.close()


async def test_doc_expires_by_the_callers_now_and_redis_ttl_still_collects_it(
    redis: tuple[RedisStore, Redis],
) -> None:
    store, raw = redis
    await store.put_doc("c", "k", {"v": 1}, ttl_seconds=60, now=NOW)
    key = redis_key(PREFIX, "doc", "c", "k")
    assert 0 < await raw.ttl(key) <= 60
    assert await store.get_doc("c", "k", now=NOW + 59.5) == {"v": 1}
    # Expired for the caller although Redis, on its own clock, still holds the key.
    assert await store.get_doc("c", "k", now=NOW + 60) is None
    assert await store.list_docs("c", now=NOW + 60) == []
    assert await raw.exists(key) == 1


async def test_counter_window_follows_the_callers_now_and_redis_ttl_still_collects_it(
    redis: tuple[RedisStore, Redis],
) -> None:
    store, raw = redis
    assert await store.incr("n", 3, 30, now=NOW) == 3
    assert 0 < await raw.ttl(redis_key(PREFIX, "counter", "n")) <= 30
    assert await store.incr("n", 0, 30, now=NOW + 29.9) == 3
    assert await store.incr("n", 1, 30, now=NOW + 30) == 1


async def test_docs_written_without_a_stored_expiry_are_still_read_and_swapped(
    redis: tuple[RedisStore, Redis],
) -> None:
    store, raw = redis
    # As older versions wrote them: canonical JSON, a TTL only on Redis's clock.
    key, index = redis_key(PREFIX, "doc", "c", "old"), redis_key(PREFIX, "docs", "c")
    await raw.set(key, '{"a":1,"b":[2]}', ex=600)
    await raw.sadd(index, key)
    later = NOW + 10_000
    assert await store.get_doc("c", "old", now=later) == {"a": 1, "b": [2]}
    assert await store.list_docs("c", now=later) == [{"a": 1, "b": [2]}]
    assert await store.swap_doc("c", "old", {"b": [2], "a": 1}, {"a": 2}, now=later) is True
    assert await store.get_doc("c", "old", now=later) == {"a": 2}
