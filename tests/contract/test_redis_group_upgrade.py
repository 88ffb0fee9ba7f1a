"""A Redis written by the layout before owner groups (each bucket's counters in a string of
its own, records naming those keys), then served by this version: the windows' spend and
the open holds still count, even through a refusal; open records hold, repeat, conflict,
commit and expire as before; and every bucket ends in its owner's group, its own key gone.
Also: a group lives as long as its longest-lived bucket, and windows that ended in it do
not count."""

from __future__ import annotations

import struct

from redis.asyncio import Redis

from sidecar.model import TokenUsage
from sidecar.store import redis_record
from sidecar.store.budget_types import BucketView, LedgerDims, ReserveRequest, dims_to_json
from sidecar.store.redis_store import RedisStore
from tests.support.redis_admin import flush_redis

NOW = 1_800_000_000.0
DAY = int(NOW) // 86400 * 86400
HOUR = int(NOW) // 3600 * 3600
STEP = 60
SLOT = int(NOW) // STEP * STEP
SINCE = SLOT - 59 * STEP
PREFIX = "gr:"
DIMS = dims_to_json(LedgerDims("alice@example.com", ("eng",), "", "user", "gpt-4o", "openai"))

DAILY = BucketView("daily|user=alice", DAY, DAY, 90_000, 1_000)
HOURLY = BucketView("hourly|user=alice", SLOT, SINCE, 7_200, 1_000)
GROUP = f"{PREFIX}c:{{o:user=alice}}"
COUNTERS = {b: f"{GROUP}:{b.key}" for b in (DAILY, HOURLY)}
SLOTS = f"{PREFIX}b:{{o:user=alice}}:{HOURLY.key}"
INDEX = f"{PREFIX}{{n0}}:li:{HOUR}"
COUNTERS_FORMAT = struct.Struct(">qqqq")


def record_before_groups(rid: str, expires: float, held: int, binding: str) -> bytes:
    """An open home record as the layout before groups packed it (no version byte; each
    bucket named by its own counters key), holding `held` in both buckets."""
    head = struct.pack(">cqdbqqqd", b"o", held, expires, 1, HOUR, 0, 0, NOW - 60)
    texts = b"".join(redis_record.text(t) for t in (binding, DIMS, INDEX, "", rid))
    entries = b""
    for bucket, slots in ((DAILY, ""), (HOURLY, SLOTS)):
        entries += b"".join(
            redis_record.text(t) for t in (COUNTERS[bucket], slots, "usd")
        ) + struct.pack(
            ">qqqqqbq", bucket.slot, bucket.since, bucket.ttl_seconds, held, held, 1, 1_000
        )
    return head + texts + struct.pack(">h", 2) + entries


async def write_layout_before_groups(client: Redis) -> None:
    # Two open reservations of 200 each (one expiring in half a second): 400 held in each
    # bucket. The day spent 500; the hour 300 (100 and 200 in two of its slots).
    alive = int(NOW) + 100_000
    for bucket, spent, window in ((DAILY, 500, DAY), (HOURLY, 300, SINCE)):
        await client.set(
            COUNTERS[bucket], COUNTERS_FORMAT.pack(spent, 400, window, alive), ex=100_000
        )
    await client.hset(SLOTS, mapping={str(SLOT - 120): 100, str(SLOT): 200})
    await client.expire(SLOTS, 100_000)
    for rid, expires in (("old-open", NOW + 600), ("old-expired", NOW + 0.5)):
        record = f"{PREFIX}{{n0}}:r:{rid}"
        await client.set(record, record_before_groups(rid, expires, 200, "same"))
        await client.zadd(f"{PREFIX}{{n0}}:open", {record: expires})


async def states(store: RedisStore, now: float) -> list[tuple[int, int]]:
    return [(s.spent, s.reserved) for s in await store.bucket_states([DAILY, HOURLY], now)]


async def test_counters_and_records_of_the_layout_before_groups_count_after_the_upgrade(
    redis_url: str,
) -> None:
    await flush_redis(redis_url)
    client = Redis.from_url(redis_url)
    store = RedisStore(redis_url, prefix=PREFIX)
    try:
        await write_layout_before_groups(client)
        record = await store.reservation("old-open")
        assert record is not None and (record.state, record.estimate) == ("open", 200)
        assert await states(store, NOW) == [(500, 400), (300, 400)]
        # The holds count: 500 + 400 held leave exactly 100 in the day. The refusal moves
        # the day's counters into the group (their own key goes) and loses nothing.
        over = ReserveRequest("new-over", (DAILY,), 101, "reserve", NOW, NOW + 600)
        refused = await store.reserve(over)
        assert not refused.admitted and refused.failed == (0,)
        assert not await client.exists(COUNTERS[DAILY])
        assert await client.hexists(GROUP, DAILY.key)
        assert await states(store, NOW) == [(500, 400), (300, 400)]
        # A repeat of an open reservation is a duplicate; another binding conflicts.
        again = ReserveRequest(
            "old-open", (DAILY, HOURLY), 200, "reserve", NOW, NOW + 600, binding="same"
        )
        repeat = await store.reserve(again)
        assert repeat.admitted and repeat.duplicate
        other = ReserveRequest(
            "old-open", (DAILY,), 200, "reserve", NOW, NOW + 600, binding="other"
        )
        conflict = await store.reserve(other)
        assert not conflict.admitted and conflict.conflict
        assert await states(store, NOW) == [(500, 400), (300, 400)]
        # A new reservation holds in the groups next to the old ones.
        fits = ReserveRequest("new-fits", (DAILY, HOURLY), 100, "reserve", NOW, NOW + 600)
        assert (await store.reserve(fits)).admitted
        assert await states(store, NOW) == [(500, 500), (300, 500)]
        # The open one commits (its holds released, its cost charged); the expired one is
        # settled into its estimate by the next sweep, and a late commit charges the rest.
        commit = await store.commit("old-open", 30, TokenUsage(5, 6), NOW + 1)
        assert (commit.status, commit.estimate) == ("committed", 200)
        assert (await store.commit("old-open", 30, TokenUsage(), NOW + 2)).status == "duplicate"
        assert await store.settle_expired(NOW + 1) == 1
        assert await states(store, NOW + 1) == [(730, 100), (530, 100)]
        late = await store.commit("old-expired", 50, TokenUsage(1, 1), NOW + 2)
        assert late.status == "late"
        assert await states(store, NOW + 2) == [(580, 100), (380, 100)]
        (hourly,) = await store.bucket_states([HOURLY], NOW + 2)
        assert hourly.slots == {SLOT - 120: 100, SLOT: 280}
        assert (await store.commit("new-fits", 100, TokenUsage(), NOW + 3)).status == "committed"
        assert await states(store, NOW + 3) == [(680, 0), (480, 0)]
        # Every bucket now lives in its owner's group, which lives as long as they must.
        assert not await client.exists(*COUNTERS.values())
        assert sorted(await client.hkeys(GROUP)) == [b"", DAILY.key.encode(), HOURLY.key.encode()]
        assert await client.ttl(GROUP) >= 90_000
    finally:
        await store.close()
        await client.aclose()


async def test_a_group_lives_as_long_as_its_longest_lived_bucket_and_ended_windows_do_not_count(
    redis_url: str,
) -> None:
    await flush_redis(redis_url)
    store = RedisStore(redis_url, prefix=PREFIX)
    client = Redis.from_url(redis_url)
    # Three buckets of one owner: a day, an hour rolling, and one whose data lives 100 s.
    short = BucketView("short|user=alice", DAY, DAY, 100, 1_000)
    views = (DAILY, HOURLY, short)
    try:
        request = ReserveRequest("all", views, 600, "reserve", NOW, NOW + 60)
        assert (await store.reserve(request)).admitted
        assert (await store.commit("all", 600, TokenUsage(), NOW)).status == "committed"
        # One key for the three, kept as long as the day needs; none of their own.
        assert sorted(await client.hkeys(GROUP)) == sorted([b"", *(v.key.encode() for v in views)])
        assert await client.ttl(GROUP) >= 90_000
        assert not await client.exists(*(f"{GROUP}:{v.key}" for v in views))
        spent = [s.spent for s in await store.bucket_states(list(views), NOW)]
        assert spent == [600, 600, 600]
        # An hour and a day later, the hour's window and the fixed windows' slots moved on:
        # nothing of that spend counts, though the group still holds the fields.
        later = NOW + 86_400 + 3_600
        day, slot = DAY + 86_400, int(later) // STEP * STEP
        moved = (
            BucketView(DAILY.key, day, day, 90_000, 1_000),
            BucketView(HOURLY.key, slot, slot - 59 * STEP, 7_200, 1_000),
            BucketView(short.key, day, day, 100, 1_000),
        )
        states = await store.bucket_states(list(moved), later)
        assert [(s.spent, s.reserved) for s in states] == [(0, 0)] * 3
        fits = ReserveRequest("next", moved, 1_000, "reserve", later, later + 60)
        result = await store.reserve(fits)
        assert result.admitted
        assert [(s.spent, s.reserved) for s in result.states] == [(0, 1_000)] * 3
    finally:
        await store.close()
        await client.aclose()


async def test_interleaved_owners_and_a_bucket_named_twice_hold_and_commit_exactly(
    redis_url: str,
) -> None:
    # The scripts read and write a group as a run of its buckets: the store puts one
    # owner's buckets together, and a bucket named twice holds and is charged twice.
    await flush_redis(redis_url)
    store = RedisStore(redis_url, prefix=PREFIX)
    try:
        bob = BucketView("daily|user=bob", DAY, DAY, 90_000, 1_000)
        views = (DAILY, bob, HOURLY, DAILY)
        request = ReserveRequest("mixed", views, 100, "reserve", NOW, NOW + 600)
        result = await store.reserve(request)
        assert result.admitted
        assert [(s.spent, s.reserved) for s in result.states] == [
            (0, 100),
            (0, 100),
            (0, 100),
            (0, 200),
        ]
        held = await store.bucket_states([DAILY, bob, HOURLY], NOW)
        assert [(s.spent, s.reserved) for s in held] == [(0, 200), (0, 100), (0, 100)]
        # 200 held of 1,000 in the day: 801 more is one too many.
        over = ReserveRequest("over", (bob, DAILY), 801, "reserve", NOW, NOW + 600)
        refused = await store.reserve(over)
        assert not refused.admitted and refused.failed == (1,)
        assert (await store.commit("mixed", 30, TokenUsage(), NOW + 1)).status == "committed"
        done = await store.bucket_states([DAILY, bob, HOURLY], NOW + 1)
        assert [(s.spent, s.reserved) for s in done] == [(60, 0), (30, 0), (30, 0)]
    finally:
        await store.close()
