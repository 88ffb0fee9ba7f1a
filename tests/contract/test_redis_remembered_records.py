"""A Redis commit uses the record its reserve decoded only while the stored bytes are those.

The functions remember each record a reserve wrote, per server (budget_lib.lua
`remember`). Lua's state is one per server, shared by its databases, so the same key name
in two databases, or a record that changed since it was written, must be read from what
is stored: these tests commit such records and hold every bucket to what was charged.
"""

from __future__ import annotations

import uuid

from sidecar.model import TokenUsage
from sidecar.store.budget_types import BucketView, ReserveRequest
from sidecar.store.redis_store import RedisStore
from tests.contract.test_store_charge import DAY, NOW
from tests.support.redis_admin import flush_redis


def bucket(name: str) -> BucketView:
    return BucketView(f"daily|user={name}", DAY, DAY, 90_000, 10_000)


def request(rid: str, amount: int, *buckets: BucketView, ttl: float = 600) -> ReserveRequest:
    return ReserveRequest(rid, buckets, amount, "reserve", NOW, NOW + ttl)


async def spent_reserved(store: RedisStore, *buckets: BucketView) -> list[tuple[int, int]]:
    return [(s.spent, s.reserved) for s in await store.bucket_states(list(buckets), NOW + 1)]


async def test_the_same_record_key_in_two_databases_is_committed_from_its_own_bytes(
    redis_url: str,
) -> None:
    await flush_redis(redis_url)
    other_db = redis_url.rsplit("/", 1)[0] + "/1"
    await flush_redis(other_db)
    prefix = f"rem-{uuid.uuid4().hex[:8]}:"
    first, second = RedisStore(redis_url, prefix=prefix), RedisStore(other_db, prefix=prefix)
    alice, bob = bucket("alice"), bucket("bob")
    try:
        # One record key name in both databases, for different buckets and amounts; the
        # server remembers the second one written.
        assert (await first.reserve(request("r1", 300, alice))).admitted
        assert (await second.reserve(request("r1", 500, bob))).admitted
        # The first database's record is not the bytes remembered: its own buckets pay.
        assert (await first.commit("r1", 120, TokenUsage(), NOW + 1)).status == "committed"
        assert await spent_reserved(first, alice, bob) == [(120, 0), (0, 0)]
        assert await spent_reserved(second, alice, bob) == [(0, 0), (0, 500)]
        assert (await second.commit("r1", 450, TokenUsage(), NOW + 1)).status == "committed"
        assert await spent_reserved(second, alice, bob) == [(0, 0), (450, 0)]
        assert await spent_reserved(first, alice, bob) == [(120, 0), (0, 0)]
    finally:
        await first.close()
        await second.close()


async def test_a_record_expired_since_it_was_remembered_is_committed_late(redis_url: str) -> None:
    await flush_redis(redis_url)
    store = RedisStore(redis_url, prefix=f"rem-{uuid.uuid4().hex[:8]}:")
    alice = bucket("alice")
    try:
        assert (await store.reserve(request("r1", 300, alice, ttl=5))).admitted
        # The sweep settles it into its estimate: its bytes now say "expired".
        assert await store.settle_expired(NOW + 10) == 1
        assert await spent_reserved(store, alice) == [(300, 0)]
        late = await store.commit("r1", 120, TokenUsage(), NOW + 11)
        assert (late.status, late.estimate) == ("late", 300)
        # Charged its actual cost once: the estimate corrected, no hold released twice.
        assert await spent_reserved(store, alice) == [(120, 0)]
        again = await store.commit("r1", 120, TokenUsage(), NOW + 12)
        assert again.status == "duplicate"
        assert await spent_reserved(store, alice) == [(120, 0)]
    finally:
        await store.close()
