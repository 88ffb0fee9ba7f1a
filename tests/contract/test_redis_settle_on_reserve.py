"""What a Redis reserve settles before it decides.

A reserve settles the reservations of its shard that expired, but looks for them only when
one may be due: its functions note the earliest expiry each index holds. These tests follow
that note through reserves that skip the look-up and one that must not, and show the expiry
sweep still settling a record indexed by a writer the functions never saw (an older
version beside this one). On a cluster, where each shard has two indexes to look in, a
request over several owners and a bucket named twice still reserves, commits and refuses
exactly.
"""

from __future__ import annotations

import uuid

from redis.asyncio import Redis

from devtools.redis_cluster import LocalCluster
from sidecar.model import TokenUsage
from sidecar.store.budget_types import BucketView, ReserveRequest
from sidecar.store.redis_store import RedisStore
from tests.support.redis_admin import flush_redis

NOW = 1_800_000_000.0
DAY = int(NOW) // 86400 * 86400
DAILY = BucketView("daily|user=alice", DAY, DAY, 90_000, 1_000)


def request(rid: str, amount: int, now: float, ttl: float) -> ReserveRequest:
    return ReserveRequest(rid, (DAILY,), amount, "reserve", now, now + ttl)


async def test_a_reserve_settles_what_expired_after_reserves_that_skipped_the_look_up(
    redis_url: str,
) -> None:
    await flush_redis(redis_url)
    # A prefix of its own: the functions' note is per index key.
    prefix = f"due-{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_url, prefix=prefix)
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        assert (await store.reserve(request("r1", 300, NOW, 10))).admitted
        # r1 expires at NOW + 10: nothing is due at NOW + 5.
        second = await store.reserve(request("r2", 300, NOW + 5, 100))
        assert second.admitted and [(s.spent, s.reserved) for s in second.states] == [(0, 600)]
        r1 = await store.reservation("r1")
        assert r1 is not None and r1.state == "open"
        # At NOW + 11 it is: the reserve settles r1 into its estimate before it decides.
        third = await store.reserve(request("r3", 100, NOW + 11, 100))
        assert third.admitted and [(s.spent, s.reserved) for s in third.states] == [(300, 400)]
        r1 = await store.reservation("r1")
        assert r1 is not None and r1.state == "expired"

        # A writer these functions never saw indexes r2 as due at NOW + 20 (the note still
        # says NOW + 105): the next reserve does not look, and r2 keeps holding its 300.
        await client.zadd(f"{prefix}{{n0}}:open", {f"{prefix}{{n0}}:r:r2": NOW + 20})
        fourth = await store.reserve(request("r4", 100, NOW + 21, 100))
        assert fourth.admitted and [(s.spent, s.reserved) for s in fourth.states] == [(300, 500)]
        # The sweep always looks: r2 is settled, its hold now spend.
        assert await store.settle_expired(NOW + 21) == 1
        (state,) = await store.bucket_states([DAILY], NOW + 21)
        assert (state.spent, state.reserved) == (600, 200)
        # And the note learnt from that look: a record due later than it is seen again.
        fifth = await store.reserve(request("r5", 50, NOW + 22, 1))
        assert fifth.admitted
        sixth = await store.reserve(request("r6", 50, NOW + 24, 100))
        assert sixth.admitted and [(s.spent, s.reserved) for s in sixth.states] == [(650, 250)]
    finally:
        await store.close()
        await client.aclose()


async def test_a_cluster_request_over_six_owners_and_a_bucket_named_twice_is_exact(
    redis_cluster: LocalCluster,
) -> None:
    await flush_redis(redis_cluster.url)
    store = RedisStore(redis_cluster.url, prefix=f"mget-{uuid.uuid4().hex[:8]}:")
    # Six owners over three shards (some shard holds two of them), u0 with two buckets,
    # and u0's daily bucket named twice.
    owners = [f"user=u{i}" for i in range(6)]
    buckets = [BucketView(f"daily|{o}", DAY, DAY, 90_000, 1_000) for o in owners]
    weekly = BucketView("weekly|user=u0", DAY, DAY, 90_000, 1_000)
    views = (*buckets, weekly, buckets[0])
    try:
        first = await store.reserve(ReserveRequest("m1", views, 100, "reserve", NOW, NOW + 60))
        assert first.admitted
        assert [(s.spent, s.reserved) for s in first.states] == [(0, 100)] * 7 + [(0, 200)]
        commit = await store.commit("m1", 70, TokenUsage(1, 1), NOW + 1)
        assert commit.status == "committed"
        states = await store.bucket_states([*buckets, weekly], NOW + 1)
        # u0's daily bucket was named twice: charged twice, both holds released.
        assert [(s.spent, s.reserved) for s in states] == [(140, 0)] + [(70, 0)] * 6
        second = await store.reserve(ReserveRequest("m2", views, 500, "reserve", NOW + 2, NOW + 60))
        # u0's daily bucket: 140 spent + 500 held by its first naming + 500 > 1,000.
        assert not second.admitted and second.failed == (7,)
    finally:
        await store.close()
