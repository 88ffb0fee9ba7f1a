"""A Redis reservation is indexed by its expiry rounded up to the whole second.

The open index is a small sorted set, kept as a listpack, where an integer score costs an
integer comparison and a fractional one a `strtod` at every look-up (redis_store.py
`_reserve_on`). The rounding may only delay the expiry sweep by less than a second: these
tests hold the score to an integer, the sweep to that second, and the money to the
reservation's estimate, once.
"""

from __future__ import annotations

import uuid

from redis.asyncio import Redis

from sidecar.model import TokenUsage
from sidecar.store.budget_types import BucketView, ReserveRequest
from sidecar.store.redis_store import RedisStore
from tests.contract.test_store_charge import DAY, NOW
from tests.support.redis_admin import flush_redis

ALICE = BucketView("daily|user=alice", DAY, DAY, 90_000, 10_000)


async def spent_reserved(store: RedisStore) -> tuple[int, int]:
    (state,) = await store.bucket_states([ALICE], NOW + 1)
    return state.spent, state.reserved


async def test_a_fractional_expiry_is_indexed_as_the_next_whole_second_and_swept_then(
    redis_url: str,
) -> None:
    await flush_redis(redis_url)
    prefix = f"exp-{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_url, prefix=prefix)
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        request = ReserveRequest("r1", (ALICE,), 300, "reserve", NOW, NOW + 10.25)
        assert (await store.reserve(request)).admitted
        index = f"{prefix}{{n0}}:open"
        assert await client.zcard(index) == 1
        assert await client.zscore(index, f"{prefix}{{n0}}:r:r1") == NOW + 11
        # Past its exact expiry but before the indexed second: not swept yet, still held.
        assert await store.settle_expired(NOW + 10.5) == 0
        assert await spent_reserved(store) == (0, 300)
        # At the indexed second: swept, charged its estimate once.
        assert await store.settle_expired(NOW + 11) == 1
        assert await spent_reserved(store) == (300, 0)
        assert await store.settle_expired(NOW + 12) == 0
        assert await spent_reserved(store) == (300, 0)
        # Its commit comes late and corrects the estimate to the actual cost.
        late = await store.commit("r1", 120, TokenUsage(), NOW + 12)
        assert (late.status, late.estimate) == ("late", 300)
        assert await spent_reserved(store) == (120, 0)
    finally:
        await client.aclose()
        await store.close()


async def test_a_commit_between_the_exact_expiry_and_the_sweep_is_charged_once(
    redis_url: str,
) -> None:
    await flush_redis(redis_url)
    store = RedisStore(redis_url, prefix=f"exp-{uuid.uuid4().hex[:8]}:")
    try:
        request = ReserveRequest("r2", (ALICE,), 300, "reserve", NOW, NOW + 10.25)
        assert (await store.reserve(request)).admitted
        committed = await store.commit("r2", 120, TokenUsage(), NOW + 10.5)
        assert committed.status == "committed"
        assert await spent_reserved(store) == (120, 0)
        # The sweep at the indexed second finds nothing left to charge.
        assert await store.settle_expired(NOW + 11) == 0
        assert await spent_reserved(store) == (120, 0)
    finally:
        await store.close()
