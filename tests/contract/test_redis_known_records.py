"""A Redis server's commit uses what its reserve decoded of a record only while the stored
record is that very write (same nonce): a record finished, rewritten, or of the layout
before nonces is read from Redis, and the stored record decides what is charged."""

from __future__ import annotations

from redis.asyncio import Redis

from sidecar.model import TokenUsage
from sidecar.store import redis_record
from sidecar.store.budget_types import BucketView, ReserveRequest
from sidecar.store.redis_store import RedisStore
from tests.support.redis_admin import flush_redis

NOW = 1_800_000_000.0
DAY = int(NOW) // 86400 * 86400
PREFIX = "kn:"


def daily(user: str) -> BucketView:
    return BucketView(f"daily|user={user}", DAY, DAY, 90_000, 1_000)


def request(rid: str, user: str, amount: int) -> ReserveRequest:
    return ReserveRequest(rid, (daily(user),), amount, "reserve", NOW, NOW + 600)


def record_key(rid: str) -> str:
    return f"{PREFIX}{{n0}}:r:{rid}"


async def spent_and_held(store: RedisStore, user: str) -> tuple[int, int]:
    (state,) = await store.bucket_states([daily(user)], NOW + 1)
    return state.spent, state.reserved


async def test_a_record_finished_since_its_reserve_is_a_duplicate_and_charges_nothing(
    redis_url: str,
) -> None:
    await flush_redis(redis_url)
    client = Redis.from_url(redis_url)
    store = RedisStore(redis_url, prefix=PREFIX)
    try:
        assert (await store.reserve(request("r1", "alice", 100))).admitted
        # Another server finished it (as a replicated commit rewrites the state byte).
        await client.setrange(record_key("r1"), 0, b"c")
        result = await store.commit("r1", 70, TokenUsage(), NOW + 1)
        assert (result.status, result.estimate) == ("duplicate", 100)
        assert await spent_and_held(store, "alice") == (0, 100)
    finally:
        await store.close()
        await client.aclose()


async def test_a_record_rewritten_since_its_reserve_is_committed_as_stored(
    redis_url: str,
) -> None:
    await flush_redis(redis_url)
    client = Redis.from_url(redis_url)
    store = RedisStore(redis_url, prefix=PREFIX)
    try:
        assert (await store.reserve(request("r1", "alice", 100))).admitted
        assert (await store.reserve(request("r2", "bob", 40))).admitted
        # r1's key now holds another write (another nonce): bob's bucket, not alice's.
        other = await client.get(record_key("r2"))
        assert other is not None
        await client.set(record_key("r1"), other)
        result = await store.commit("r1", 70, TokenUsage(), NOW + 1)
        assert (result.status, result.estimate) == ("committed", 40)
        assert await spent_and_held(store, "bob") == (70, 0)
        assert await spent_and_held(store, "alice") == (0, 100)
    finally:
        await store.close()
        await client.aclose()


async def test_a_record_without_a_nonce_is_read_and_committed(redis_url: str) -> None:
    await flush_redis(redis_url)
    client = Redis.from_url(redis_url)
    store = RedisStore(redis_url, prefix=PREFIX)
    try:
        assert (await store.reserve(request("r1", "alice", 100))).admitted
        # As the layout before nonces wrote it: the same bytes without the last eight.
        stored = await client.get(record_key("r1"))
        assert stored is not None
        await client.set(record_key("r1"), stored[: -redis_record.NONCE_BYTES])
        result = await store.commit("r1", 70, TokenUsage(), NOW + 1)
        assert (result.status, result.estimate) == ("committed", 100)
        assert await spent_and_held(store, "alice") == (70, 0)
        assert (await store.commit("r1", 70, TokenUsage(), NOW + 2)).status == "duplicate"
        assert await spent_and_held(store, "alice") == (70, 0)
    finally:
        await store.close()
        await client.aclose()
