"""A Redis written by the store's earlier layout (a bucket in one hash with its slots, "r"
held, "t"/"f" running total and "k" alive-until; records and ledger hours as hashes), then
served by this version: the current windows' spend and the open holds still count, open
records commit and expire as before, and the ledger keeps its rows."""

from __future__ import annotations

import json

from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from sidecar.model import TokenUsage
from sidecar.store.budget_types import BucketView, LedgerDims, ReserveRequest, dims_to_json
from sidecar.store.redis_store import RedisStore
from tests.support.redis_admin import flush_redis

NOW = 1_800_000_000.0
DAY = int(NOW) // 86400 * 86400
HOUR = int(NOW) // 3600 * 3600
STEP = 60
SLOT = int(NOW) // STEP * STEP
PREFIX = "up:"
DIMS = dims_to_json(LedgerDims("alice@example.com", ("eng",), "", "user", "gpt-4o", "openai"))

DAILY = BucketView("daily|user=alice", DAY, DAY, 90_000, 1_000)
HOURLY = BucketView("hourly|user=alice", SLOT, SLOT - 59 * STEP, 7_200, 1_000)


def old_record(rid: str, expires: float, held: int) -> dict[FieldT, EncodableT]:
    """An open home record as the earlier layout wrote it, holding `held` in both buckets."""
    entries = [
        f"{PREFIX}b:{{o:user=alice}}:{DAILY.key}", DAY, DAILY.ttl_seconds, "usd", held, held, 0,
        f"{PREFIX}b:{{o:user=alice}}:{HOURLY.key}", SLOT, HOURLY.ttl_seconds, "usd", held, held, 1,
    ]  # fmt: skip
    return {
        "s": "open", "e": str(held), "x": repr(expires), "bd": "same", "b": json.dumps(entries),
        "hm": "1", "c": repr(NOW - 60), "d": DIMS, "l": f"{PREFIX}{{n0}}:l:{HOUR}",
        "hr": str(HOUR), "ti": "0", "to": "0", "g": "", "id": rid,
    }  # fmt: skip


async def write_old_layout(client: Redis) -> None:
    # Two open reservations of 200 each (one expiring in half a second): 400 held in each
    # bucket. The daily window spent 500 today (and 999 in yesterday's slot, which no
    # longer counts); the hourly window spent 100 and 200 in two slots of its hour (and 50
    # before it).
    daily = f"{PREFIX}b:{{o:user=alice}}:{DAILY.key}"
    hourly = f"{PREFIX}b:{{o:user=alice}}:{HOURLY.key}"
    await client.hset(
        daily, mapping={str(DAY): 500, str(DAY - 86400): 999, "r": 400, "k": int(NOW) + 90_000}
    )
    await client.hset(
        hourly,
        mapping={
            str(SLOT - 120): 100,
            str(SLOT): 200,
            str(SLOT - 3600): 50,
            "r": 400,
            "t": 300,
            "f": SLOT - 59 * STEP,
            "k": int(NOW) + 7_200,
        },
    )
    for key in (daily, hourly):
        await client.expire(key, 90_000)
    for rid, expires in (("old-open", NOW + 600), ("old-expired", NOW + 0.5)):
        record = f"{PREFIX}{{n0}}:r:{rid}"
        await client.hset(record, mapping=old_record(rid, expires, 200))
        await client.zadd(f"{PREFIX}{{n0}}:open", {record: expires})
    ledger = f"{PREFIX}{{n0}}:l:{HOUR}"
    await client.hset(ledger, mapping={f"c|{DIMS}": 900, f"n|{DIMS}": 3, f"i|{DIMS}": 30})
    await client.zadd(f"{PREFIX}{{n0}}:hours", {str(HOUR): HOUR})


async def test_an_upgraded_redis_keeps_spend_holds_records_and_ledger(redis_url: str) -> None:
    await flush_redis(redis_url)
    client = Redis.from_url(redis_url, decode_responses=True)
    store = RedisStore(redis_url, prefix=PREFIX)
    try:
        await write_old_layout(client)
        # Read through before anything touched the buckets: the old hashes' spend and holds.
        states = await store.bucket_states([DAILY, HOURLY], NOW)
        assert [(s.spent, s.reserved) for s in states] == [(500, 400), (300, 400)]
        # Spend and holds are enforced: 500 + 400 held leave exactly 100 in the day.
        over = ReserveRequest("new-over", (DAILY,), 101, "reserve", NOW, NOW + 600)
        result = await store.reserve(over)
        assert not result.admitted and result.failed == (0,)
        assert [(s.spent, s.reserved) for s in result.states] == [(500, 400)]
        fits = ReserveRequest("new-fits", (DAILY, HOURLY), 100, "reserve", NOW, NOW + 600)
        result = await store.reserve(fits)
        assert result.admitted
        assert [(s.spent, s.reserved) for s in result.states] == [(500, 500), (300, 500)]
        # The open old reservation commits (its holds released, its cost charged); the
        # expired one is settled into its estimate by the next sweep.
        commit = await store.commit("old-open", 30, TokenUsage(5, 6), NOW + 1)
        assert commit.status == "committed" and commit.estimate == 200
        assert await store.settle_expired(NOW + 1) == 1
        states = await store.bucket_states([DAILY, HOURLY], NOW + 1)
        assert [(s.spent, s.reserved) for s in states] == [(730, 100), (530, 100)]
        assert states[1].slots == {SLOT - 120: 100, SLOT: 430}
        # A repeated commit changes nothing; a late one charges the difference.
        assert (await store.commit("old-open", 30, TokenUsage(), NOW + 2)).status == "duplicate"
        late = await store.commit("old-expired", 50, TokenUsage(1, 1), NOW + 2)
        assert late.status == "late"
        states = await store.bucket_states([DAILY, HOURLY], NOW + 2)
        assert [(s.spent, s.reserved) for s in states] == [(580, 100), (380, 100)]
        record = await store.reservation("old-open")
        assert record is not None and record.state == "committed" and record.estimate == 200
        # The old hour's ledger hash still reads, with what the old records booked since.
        (row,) = await store.ledger_rows(HOUR, HOUR + 3600)
        assert (row.cost, row.requests, row.input_tokens) == (900 + 30 + 50, 5, 30 + 5 + 1)
        # The new reservation commits into the adopted counters as usual.
        assert (await store.commit("new-fits", 100, TokenUsage(), NOW + 3)).status == "committed"
        states = await store.bucket_states([DAILY, HOURLY], NOW + 3)
        assert [(s.spent, s.reserved) for s in states] == [(680, 0), (480, 0)]
    finally:
        await store.close()
        await client.aclose()
