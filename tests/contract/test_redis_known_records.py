"""What a Redis server remembers of what its reserves decoded. A commit uses a remembered
record only while the stored record is that very write (same nonce): a record finished,
rewritten, or of the layout before nonces is read from Redis, and the stored record decides
what is charged. A reserve with the buckets of one before (its plan) holds and reports its
own amounts, in every measure and mode."""

from __future__ import annotations

from redis.asyncio import Redis

from devtools.redis_cluster import LocalCluster
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


def planned(user: str) -> tuple[BucketView, ...]:
    return (
        daily(user),
        BucketView(f"tokens|user={user}", DAY, DAY, 90_000, 1_000, measure="tokens"),
        BucketView(f"out|user={user}", DAY, DAY, 90_000, 1_000, measure="output_tokens"),
        BucketView(f"calls|user={user}", DAY, DAY, 90_000, 1_000, measure="requests"),
    )


async def held(store: RedisStore, user: str) -> list[int]:
    return [s.reserved for s in await store.bucket_states(list(planned(user)), NOW + 1)]


async def test_reserves_of_one_plan_hold_and_release_their_own_amounts(redis_url: str) -> None:
    await flush_redis(redis_url)
    store = RedisStore(redis_url, prefix=PREFIX)
    try:
        buckets = planned("carol")
        first = ReserveRequest("p1", buckets, 100, "reserve", NOW, NOW + 600, tokens=(10, 20))
        assert (await store.reserve(first)).admitted
        assert await held(store, "carol") == [100, 30, 20, 1]
        # The same plan: optimistic holds nothing; another estimate holds its own amounts.
        light = ReserveRequest("p2", buckets, 7, "optimistic", NOW, NOW + 600, tokens=(3, 4))
        assert (await store.reserve(light)).admitted
        assert await held(store, "carol") == [100, 30, 20, 1]
        other = ReserveRequest("p3", buckets, 50, "reserve", NOW, NOW + 600, tokens=(1, 2))
        result = await store.reserve(other)
        assert result.admitted
        assert [s.reserved for s in result.states] == [150, 33, 22, 2]
        # Each commit releases exactly its own holds; a late one charges its estimate's
        # difference in each measure.
        assert (await store.commit("p3", 40, TokenUsage(5, 6), NOW + 1)).status == "committed"
        assert await held(store, "carol") == [100, 30, 20, 1]
        assert (await store.commit("p1", 90, TokenUsage(8, 9), NOW + 1)).status == "committed"
        assert await held(store, "carol") == [0, 0, 0, 0]
        states = await store.bucket_states(list(buckets), NOW + 1)
        assert [s.spent for s in states] == [40 + 90, 11 + 17, 6 + 9, 2]
        assert await store.settle_expired(NOW + 601) == 1  # p2: its estimate, 7 and 3 + 4
        assert [s.spent for s in await store.bucket_states(list(buckets), NOW + 601)] == [
            130 + 7,
            28 + 7,
            15 + 4,
            3,
        ]
        late = await store.commit("p2", 10, TokenUsage(1, 1), NOW + 602)
        assert late.status == "late"
        assert [s.spent for s in await store.bucket_states(list(buckets), NOW + 602)] == [
            130 + 10,
            28 + 2,
            15 + 1,
            3,
        ]
    finally:
        await store.close()


async def test_a_bucket_named_twice_is_held_and_charged_twice_on_top_of_its_spend(
    redis_url: str,
) -> None:
    await flush_redis(redis_url)
    store = RedisStore(redis_url, prefix=PREFIX)
    try:
        once = ReserveRequest("t1", (daily("dan"),), 30, "reserve", NOW, NOW + 600)
        assert (await store.reserve(once)).admitted
        assert (await store.commit("t1", 30, TokenUsage(), NOW + 1)).status == "committed"
        twice = ReserveRequest("t2", (daily("dan"), daily("dan")), 20, "reserve", NOW, NOW + 600)
        result = await store.reserve(twice)
        assert result.admitted
        assert [s.reserved for s in result.states] == [20, 40]
        assert (await store.commit("t2", 25, TokenUsage(), NOW + 1)).status == "committed"
        assert await spent_and_held(store, "dan") == (30 + 25 + 25, 0)
    finally:
        await store.close()


async def test_on_a_cluster_one_owners_buckets_and_several_owners_buckets_hold_and_charge(
    redis_cluster: LocalCluster,
) -> None:
    # One owner's buckets share a hash slot (one MGET reads them); a shared bucket's owner
    # is another, maybe on the same shard, in another slot (read one by one).
    await flush_redis(redis_cluster.url)
    store = RedisStore(redis_cluster.url, prefix=PREFIX)
    try:
        shared = BucketView("org|fixed:daily", DAY, DAY, 90_000, 10_000)
        for buckets in (planned("erin"), (daily("erin"), shared)):
            views = list(buckets)
            for n, amount in enumerate((100, 50)):
                rid = store.mint_request_id(views)
                request = ReserveRequest(rid, buckets, amount, "reserve", NOW, NOW + 600)
                assert (await store.reserve(request)).admitted
                assert (await store.commit(rid, amount - 10, TokenUsage(), NOW + 1)).status == (
                    "committed"
                )
                states = await store.bucket_states(views, NOW + 1)
                assert [s.reserved for s in states] == [0] * len(views), n
        states = await store.bucket_states([*planned("erin"), shared], NOW + 1)
        # erin's daily: 90 + 40 twice; tokens and output tokens: none used; requests: 2;
        # the shared bucket: 90 + 40.
        assert [s.spent for s in states] == [260, 0, 0, 2, 130]
    finally:
        await store.close()


async def test_a_reservation_older_than_the_remembered_ones_still_commits(redis_url: str) -> None:
    # A server remembers the records of its last 4,096 reserves (budget_lib.lua CACHE_SIZE).
    await flush_redis(redis_url)
    store = RedisStore(redis_url, prefix=PREFIX)
    try:
        assert (await store.reserve(request("old", "fay", 100))).admitted
        roomy = BucketView("daily|user=gus", DAY, DAY, 90_000, 1_000_000)
        for n in range(4_100):
            many = ReserveRequest(f"new-{n}", (roomy,), 1, "reserve", NOW, NOW + 600)
            assert (await store.reserve(many)).admitted
        result = await store.commit("old", 70, TokenUsage(), NOW + 1)
        assert (result.status, result.estimate) == ("committed", 100)
        assert await spent_and_held(store, "fay") == (70, 0)
        assert (await store.commit("new-4099", 1, TokenUsage(), NOW + 1)).status == "committed"
        (gus,) = await store.bucket_states([roomy], NOW + 1)
        assert (gus.spent, gus.reserved) == (1, 4_099)
    finally:
        await store.close()
