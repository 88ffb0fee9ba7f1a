"""On a Redis Cluster the store mints reservation ids that name the shard of their home
record, so a commit goes straight there: no pointer is written or read. Ids minted
elsewhere (plain ones) still find their record through the pointer, and an id forged to
name a shard finds nothing there."""

from __future__ import annotations

import re

from redis.asyncio.cluster import RedisCluster

from devtools.redis_cluster import LocalCluster
from sidecar.model import TokenUsage
from sidecar.store.budget_types import BucketView, ReserveRequest
from sidecar.store.redis_keys import DEFAULT_PREFIX, redis_key
from sidecar.store.redis_store import RedisStore
from tests.support.redis_admin import flush_redis

NOW = 1_800_000_000.0
DAY = int(NOW) // 86400 * 86400


def daily(user: str) -> BucketView:
    return BucketView(f"daily|fixed:daily|user={user}", DAY, DAY, 90_000, 1_000)


def request(rid: str, *buckets: BucketView) -> ReserveRequest:
    return ReserveRequest(rid, buckets, 100, "reserve", NOW, NOW + 60)


async def test_minted_ids_name_their_home_shard_and_need_no_pointer(
    redis_cluster: LocalCluster,
) -> None:
    await flush_redis(redis_cluster.url)
    store = RedisStore(redis_cluster.url)
    client = RedisCluster.from_url(redis_cluster.node_urls()[0], decode_responses=True)
    try:
        assert await store.ping()
        users = [f"u{n}@example.com" for n in range(200)]
        tags = {u: store.mint_request_id([daily(u)]).rsplit(".", 1)[1] for u in users}
        # Owners spread over the shards, so some name other shards than the first user's.
        mine, elsewhere = users[0], next(u for u in users if tags[u] != tags[users[0]])
        rid = store.mint_request_id([daily(mine)])
        assert re.fullmatch(r"[0-9a-f]{32}\.n[0-9]+", rid)
        assert (await store.reserve(request(rid, daily(mine)))).admitted
        assert not await client.exists(redis_key(DEFAULT_PREFIX, "home", rid))
        assert (await store.commit(rid, 40, TokenUsage(), NOW + 1)).status == "committed"
        # An id naming another shard than its buckets' keeps its home there.
        other = store.mint_request_id([daily(elsewhere)])
        assert (await store.reserve(request(other, daily(mine)))).admitted
        record = await store.reservation(other)
        assert record is not None and record.state == "open"
        assert (await store.commit(other, 60, TokenUsage(), NOW + 1)).status == "committed"
        (state,) = await store.bucket_states([daily(mine)], NOW + 1)
        assert (state.spent, state.reserved) == (100, 0)
        # A plain id still works through its pointer; a forged one finds nothing.
        assert (await store.reserve(request("plain-id", daily(mine)))).admitted
        assert await client.exists(redis_key(DEFAULT_PREFIX, "home", "plain-id"))
        assert (await store.commit("plain-id", 1, TokenUsage(), NOW + 1)).status == "committed"
        forged = f"{'0' * 32}.{tags[elsewhere]}"
        assert (await store.commit(forged, 1, TokenUsage(), NOW + 1)).status == "unknown"
        assert await store.reservation(forged) is None
    finally:
        await client.aclose()
        await store.close()
