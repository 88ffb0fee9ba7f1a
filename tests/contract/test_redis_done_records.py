"""A committed Redis record is kept a week as its head alone, and still answers for itself.

Done records stay so that a repeated commit is a duplicate and a repeated request id a
conflict; their buckets are never read again once committed (budget_lib.lua `finish`), so
only the head is kept: a fifth of a 7-bucket record's bytes. An expired record keeps its
buckets, which its late commit charges. These tests commit records remembered by the
server's functions and records it has to read (the library loaded afresh), and hold each
answer and every bucket to what was charged.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import NamedTuple

import pytest
from redis.asyncio import Redis

from sidecar.model import TokenUsage
from sidecar.store.budget_types import BucketView, ReserveRequest
from sidecar.store.redis_store import RedisStore
from tests.contract.test_store_charge import DAY, NOW
from tests.support.redis_admin import flush_redis

BUCKETS = tuple(BucketView(f"daily|rule{i}|user=alice", DAY, DAY, 90_000, 10**6) for i in range(7))


def request(rid: str, amount: int, ttl: float = 600) -> ReserveRequest:
    return ReserveRequest(rid, BUCKETS, amount, "reserve", NOW, NOW + ttl)


async def spent_reserved(store: RedisStore) -> set[tuple[int, int]]:
    return {(s.spent, s.reserved) for s in await store.bucket_states(list(BUCKETS), NOW + 1)}


class Done(NamedTuple):
    store: RedisStore
    client: Redis
    records: str  # the record key of a request id, less the id


@pytest.fixture
async def done(redis_url: str) -> AsyncIterator[Done]:
    await flush_redis(redis_url)
    prefix = f"done-{uuid.uuid4().hex[:8]}:"
    store, client = RedisStore(redis_url, prefix=prefix), Redis.from_url(redis_url)
    try:
        yield Done(store, client, f"{prefix}{{n0}}:r:")
    finally:
        await client.aclose()
        await store.close()


async def test_a_committed_record_keeps_its_head_and_answers_repeats(done: Done) -> None:
    store, client, records = done
    for rid, forget in (("remembered", False), ("read", True)):
        assert (await store.reserve(request(rid, 300))).admitted
        open_bytes = await client.strlen(records + rid)
        if forget:
            # A library loaded afresh remembers no record: the commit reads it.
            await client.function_flush()
        committed = await store.commit(rid, 120, TokenUsage(), NOW + 1)
        assert (committed.status, committed.estimate) == ("committed", 300)
        done_bytes = await client.strlen(records + rid)
        assert done_bytes * 4 < open_bytes, (rid, done_bytes, open_bytes)
        assert 7 * 24 * 3600 - 5 <= await client.ttl(records + rid) <= 7 * 24 * 3600
        record = await store.reservation(rid)
        assert record is not None and (record.state, record.estimate) == ("committed", 300)
        again = await store.commit(rid, 120, TokenUsage(), NOW + 2)
        assert (again.status, again.estimate) == ("duplicate", 300)
        replayed = await store.reserve(request(rid, 300))
        assert not replayed.admitted
    # Each request charged its actual cost once, every hold released.
    assert await spent_reserved(store) == {(240, 0)}


async def test_an_expired_record_keeps_its_buckets_for_its_late_commit(done: Done) -> None:
    store, client, records = done
    key = records + "late"
    assert (await store.reserve(request("late", 300, ttl=5))).admitted
    open_bytes = await client.strlen(key)
    assert await store.settle_expired(NOW + 10) == 1
    assert await client.strlen(key) == open_bytes
    assert await spent_reserved(store) == {(300, 0)}
    late = await store.commit("late", 120, TokenUsage(), NOW + 11)
    assert (late.status, late.estimate) == ("late", 300)
    assert await spent_reserved(store) == {(120, 0)}
    assert await client.strlen(key) * 4 < open_bytes
    again = await store.commit("late", 120, TokenUsage(), NOW + 12)
    assert again.status == "duplicate"
    assert await spent_reserved(store) == {(120, 0)}
