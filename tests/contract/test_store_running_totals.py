"""Rolling windows keep a running total that must always equal the sum of the slots still in
the window, as the window moves, with late commits into older slots and with backfilled
spend; and no budget key is ever left without a TTL."""

from __future__ import annotations

from redis.asyncio import Redis

from sidecar.model import TokenUsage
from sidecar.store.base import Store
from sidecar.store.budget_types import BucketView, ReserveRequest
from sidecar.store.redis_store import RedisStore
from tests.support.redis_admin import flush_redis

NOW = 1_800_000_000.0
STEP = 60  # a one-hour rolling window: 60 slots of a minute


def rolling(at: float, limit: int = 1_000_000, key: str = "roll") -> BucketView:
    slot = int(at) // STEP * STEP
    return BucketView(key, slot, slot - 59 * STEP, 2 * 3600, limit)


def req(rid: str, amount: int, at: float, ttl: float = 30 * 60) -> ReserveRequest:
    return ReserveRequest(rid, (rolling(at),), amount, "reserve", at, at + ttl)


async def test_running_total_equals_the_slots_in_the_window_as_it_moves(store: Store) -> None:
    # Three requests a minute for two hours; each is committed 20 or 65 minutes later, into
    # its own slot: then still in the window, or already out of it. Spend is backfilled
    # into a slot in the window and into one already out of it.
    expected: dict[int, int] = {}
    for slot, amount in ((NOW - 30 * STEP, 7), (NOW - 90 * STEP, 11)):
        assert await store.add_spend(f"fill{slot}", [(rolling(slot), amount)])
        expected[rolling(slot).slot] = amount
    pending: dict[int, list[tuple[str, float]]] = {}
    for tick in range(360):
        at = NOW + tick * 20
        rid = f"r{tick}"
        result = await store.reserve(req(rid, 10, at, ttl=3 * 3600))
        assert result.admitted
        since = rolling(at).since
        in_window = sum(v for s, v in expected.items() if s >= since)
        # What the script saw equals what the independent read (every slot) sees.
        assert result.states[0].spent == in_window, tick
        (state,) = await store.bucket_states([rolling(at)], at)
        assert state.spent == in_window, tick
        pending.setdefault(tick + (60 if tick % 2 else 195), []).append((rid, at))
        for done, made in pending.pop(tick, []):
            assert (await store.commit(done, 3, TokenUsage(), at)).status == "committed"
            slot = rolling(made).slot
            expected[slot] = expected.get(slot, 0) + 3


async def test_no_budget_key_lives_without_a_ttl(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="ttl-test:")
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        await flush_redis(redis_url)
        fixed = BucketView("day", 1_799_971_200, 1_799_971_200, 90_000, 1_000)
        for n, bucket in enumerate([fixed, rolling(NOW), fixed, rolling(NOW + STEP)]):
            request = ReserveRequest(f"t{n}", (bucket,), 5, "reserve", NOW, NOW + 600)
            assert (await store.reserve(request)).admitted
            await store.commit(f"t{n}", 4, TokenUsage(), NOW)
        # A refused decision on a bucket nobody spent in yet leaves no key behind, and
        # one on a bucket that exists refreshes its running total without losing the TTL.
        for key in ("untouched", "roll"):
            over = ReserveRequest(
                f"big-{key}", (rolling(NOW + 3 * STEP, key=key),), 10**9, "reserve", NOW, NOW + 600
            )
            assert not (await store.reserve(over)).admitted
        assert not await client.exists(
            "ttl-test:b:{o:untouched}:untouched", "ttl-test:c:{o:untouched}:untouched"
        )
        keys = [k async for k in client.scan_iter("ttl-test:*")]
        assert keys
        for key in keys:
            if key.endswith((":open", ":held", ":slots", ":hours")):
                continue  # the indexes, trimmed by settle_expired rather than expired
            assert await client.ttl(key) > 0, key
    finally:
        await client.aclose()
        await store.close()


async def test_commit_into_a_bucket_lost_under_its_hold_charges_it_with_a_ttl(
    redis_url: str,
) -> None:
    # A fixed window committed in time is one read and one write of its counters; the key gone
    # (evicted, flushed) shows as a new key, whose hold must come back as zero with the
    # spend charged and a TTL set.
    store = RedisStore(redis_url, prefix="lost-test:")
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        await flush_redis(redis_url)
        fixed = BucketView("day", 1_799_971_200, 1_799_971_200, 90_000, 1_000)
        request = ReserveRequest("lost", (fixed,), 50, "reserve", NOW, NOW + 600)
        assert (await store.reserve(request)).admitted
        key = "lost-test:c:{o:day}:day"
        assert await client.delete(key) == 1
        assert (await store.commit("lost", 30, TokenUsage(), NOW + 1)).status == "committed"
        (state,) = await store.bucket_states([fixed], NOW + 1)
        assert (state.spent, state.reserved) == (30, 0)
        assert await client.ttl(key) >= 90_000
    finally:
        await client.aclose()
        await store.close()


async def test_a_bucket_decided_on_without_holds_is_kept_alive(redis_url: str) -> None:
    # Optimistic decisions hold nothing, yet each must keep the bucket's counters alive for
    # its window: a key left to its first lifetime would expire with the window's spend.
    store = RedisStore(redis_url, prefix="alive-test:")
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        await flush_redis(redis_url)
        fixed = BucketView("month", 1_799_971_200, 1_799_971_200, 1_000, 10**9)
        key = "alive-test:c:{o:month}:month"
        for n, at in enumerate((NOW, NOW + 50_000)):
            request = ReserveRequest(f"o{n}", (fixed,), 5, "optimistic", at, at + 60)
            assert (await store.reserve(request)).admitted
            (alive,) = await client.bitfield_ro(key, "i64", "#3")
            # Its TTL (1,000 s) plus the reservation's lifetime and the hold grace, from now.
            assert int(alive) >= at + 1_000 + 60 + 3_600, n
            assert await client.ttl(key) >= 1_000 + 60 + 3_600
    finally:
        await client.aclose()
        await store.close()
