"""A Redis written by the layout before records were packed bytes (records as JSON arrays,
counters and ledger rows written with BITFIELD), then served by this version: its open
reservations still hold, commit, expire, repeat and conflict as before, and what they book
lands in the same counters and ledger rows."""

from __future__ import annotations

import json

from redis.asyncio import Redis

from sidecar.model import TokenUsage
from sidecar.store.budget_types import BucketView, LedgerDims, ReserveRequest, dims_to_json
from sidecar.store.redis_store import RedisStore
from tests.support.redis_admin import flush_redis

NOW = 1_800_000_000.0
DAY = int(NOW) // 86400 * 86400
HOUR = int(NOW) // 3600 * 3600
STEP = 60
SLOT = int(NOW) // STEP * STEP
SINCE = SLOT - 59 * STEP
PREFIX = "js:"
DIMS = dims_to_json(LedgerDims("alice@example.com", ("eng",), "", "user", "gpt-4o", "openai"))

DAILY = BucketView("daily|user=alice", DAY, DAY, 90_000, 1_000)
HOURLY = BucketView("hourly|user=alice", SLOT, SINCE, 7_200, 1_000)
COUNTERS = {b: f"{PREFIX}c:{{o:user=alice}}:{b.key}" for b in (DAILY, HOURLY)}
SLOTS = f"{PREFIX}b:{{o:user=alice}}:{HOURLY.key}"
INDEX = f"{PREFIX}{{n0}}:li:{HOUR}"


def json_record(rid: str, expires: float, held: int, binding: str) -> str:
    """An open home record as the JSON layout wrote it, holding `held` in both buckets."""
    head = ["o", held, expires, binding, 1, DIMS, INDEX, HOUR, 0, 0, "", rid, NOW - 60]
    entries = [
        COUNTERS[DAILY], DAY, DAILY.ttl_seconds, "usd", held, held, 0,
        COUNTERS[HOURLY], SLOT, HOURLY.ttl_seconds, "usd", held, held, SLOTS,
    ]  # fmt: skip
    return json.dumps([*head, *entries], separators=(",", ":"))


async def write_json_layout(client: Redis) -> None:
    # Two open reservations of 200 each (one expiring in half a second): 400 held in each
    # bucket. The day spent 500; the hour 300 (100 and 200 in two of its slots).
    alive = int(NOW) + 100_000
    for bucket, spent, window in ((DAILY, 500, DAY), (HOURLY, 300, SINCE)):
        fields = client.bitfield(COUNTERS[bucket]).set("i64", "#0", spent)
        fields = fields.set("i64", "#1", 400).set("i64", "#2", window)
        await fields.set("i64", "#3", alive).execute()
    await client.hset(SLOTS, mapping={str(SLOT - 120): 100, str(SLOT): 200})
    for key in (*COUNTERS.values(), SLOTS):
        await client.expire(key, 100_000)
    for rid, expires in (("old-open", NOW + 600), ("old-expired", NOW + 0.5)):
        record = f"{PREFIX}{{n0}}:r:{rid}"
        await client.set(record, json_record(rid, expires, 200, "same"))
        await client.zadd(f"{PREFIX}{{n0}}:open", {record: expires})
    # The hour's ledger row as BITFIELD left it after three requests (no errors field).
    row = client.bitfield(f"{INDEX}|{DIMS}").incrby("i64", "#0", 900)
    await row.incrby("i64", "#1", 3).incrby("i64", "#2", 30).incrby("i64", "#3", 0).execute()
    await client.sadd(INDEX, DIMS)
    await client.zadd(f"{PREFIX}{{n0}}:hours", {str(HOUR): HOUR})


async def states(store: RedisStore, now: float) -> list[tuple[int, int]]:
    return [(s.spent, s.reserved) for s in await store.bucket_states([DAILY, HOURLY], now)]


async def test_json_records_hold_commit_expire_and_repeat_after_the_upgrade(
    redis_url: str,
) -> None:
    await flush_redis(redis_url)
    client = Redis.from_url(redis_url, decode_responses=True)
    store = RedisStore(redis_url, prefix=PREFIX)
    try:
        await write_json_layout(client)
        record = await store.reservation("old-open")
        assert record is not None and (record.state, record.estimate) == ("open", 200)
        assert await states(store, NOW) == [(500, 400), (300, 400)]
        # The holds count: 500 + 400 held leave exactly 100 in the day.
        over = ReserveRequest("new-over", (DAILY,), 101, "reserve", NOW, NOW + 600)
        assert not (await store.reserve(over)).admitted
        # A repeat of an open JSON reservation is a duplicate; another binding conflicts.
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
        # The open one commits (its holds released, its cost charged); the expired one is
        # settled into its estimate by the next sweep, and a late commit charges the rest.
        commit = await store.commit("old-open", 30, TokenUsage(5, 6), NOW + 1)
        assert (commit.status, commit.estimate) == ("committed", 200)
        assert (await store.commit("old-open", 30, TokenUsage(), NOW + 2)).status == "duplicate"
        assert await store.settle_expired(NOW + 1) == 1
        assert await states(store, NOW + 1) == [(730, 0), (530, 0)]
        late = await store.commit("old-expired", 50, TokenUsage(1, 1), NOW + 2)
        assert late.status == "late"
        assert await states(store, NOW + 2) == [(580, 0), (380, 0)]
        (hourly,) = await store.bucket_states([HOURLY], NOW + 2)
        assert hourly.slots == {SLOT - 120: 100, SLOT: 280}
        record = await store.reservation("old-expired")
        assert record is not None and record.state == "committed"
        (row,) = await store.ledger_rows(HOUR, HOUR + 3600)
        assert (row.cost, row.requests, row.input_tokens) == (900 + 30 + 50, 5, 30 + 5 + 1)
        # New reservations write the packed layout into the same counters.
        fits = ReserveRequest("new-fits", (DAILY, HOURLY), 100, "reserve", NOW + 2, NOW + 600)
        assert (await store.reserve(fits)).admitted
        assert await states(store, NOW + 2) == [(580, 100), (380, 100)]
        # (Packed: its first byte is the state letter, not the "[" of a JSON array.)
        assert await client.getrange(f"{PREFIX}{{n0}}:r:new-fits", 0, 0) == "o"
        assert (await store.commit("new-fits", 100, TokenUsage(), NOW + 3)).status == "committed"
        assert await states(store, NOW + 3) == [(680, 0), (480, 0)]
    finally:
        await store.close()
        await client.aclose()
