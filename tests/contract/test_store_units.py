"""The store contract for buckets that count tokens or requests beside µUSD: each bucket
holds the estimate in its own unit, and a commit replaces it by the actual amount in it."""

from __future__ import annotations

import asyncio

from sidecar.model import TokenUsage
from sidecar.store.base import Store
from sidecar.store.budget_types import (
    AdmissionMode,
    BucketView,
    LedgerDims,
    Measure,
    ReserveRequest,
)
from tests.support.redis_admin import flush_redis
from tests.support.reserve import reserve_request

NOW = 1_800_000_000.0
SLOT = 1_799_999_940


def bucket(
    key: str, limit: int, measure: Measure, *, slot: int = SLOT, since: int = SLOT
) -> BucketView:
    return BucketView(
        key=key, slot=slot, since=since, ttl_seconds=3_660, limit=limit, measure=measure
    )


BOT = LedgerDims("bot", (), "bot", "service", "gpt-4o", "openai")


def req(
    rid: str,
    micros: int,
    tokens: tuple[int, int],
    *buckets: BucketView,
    now: float = NOW,
    mode: AdmissionMode = "reserve",
    ttl: float = 600,
) -> ReserveRequest:
    return reserve_request(
        rid, micros, *buckets, now=now, mode=mode, ttl=ttl, dims=BOT, tokens=tokens
    )


async def test_each_bucket_holds_the_estimate_in_its_own_unit(store: Store) -> None:
    usd, tok = bucket("u", 10_000, "usd"), bucket("t", 10_000, "tokens")
    rq, inp, out = (
        bucket("q", 10, "requests"),
        bucket("i", 10_000, "input_tokens"),
        bucket("o", 10_000, "output_tokens"),
    )
    result = await store.reserve(req("r1", 500, (30, 70), usd, tok, rq, inp, out))
    assert result.admitted
    assert [s.reserved for s in result.states] == [500, 100, 1, 30, 70]
    states = await store.bucket_states([usd, tok, rq, inp, out], NOW)
    assert [(s.spent, s.reserved) for s in states] == [(0, 500), (0, 100), (0, 1), (0, 30), (0, 70)]


async def test_commit_replaces_each_hold_by_the_actual_in_its_unit(store: Store) -> None:
    usd, tok, rq = (
        bucket("u", 10_000, "usd"),
        bucket("t", 10_000, "tokens"),
        bucket("q", 10, "requests"),
    )
    await store.reserve(req("r1", 500, (30, 1000), usd, tok, rq))
    result = await store.commit("r1", 120, TokenUsage(25, 40, cache_read_tokens=5), NOW + 1)
    assert result.status == "committed"
    states = await store.bucket_states([usd, tok, rq], NOW + 1)
    # Actual usage lower than the estimate: the difference is free again.
    assert [(s.spent, s.reserved) for s in states] == [(120, 0), (70, 0), (1, 0)]
    again = await store.commit("r1", 120, TokenUsage(25, 40), NOW + 2)
    assert again.status == "duplicate"
    assert await store.bucket_states([usd, tok, rq], NOW + 2) == states


async def test_commit_charges_given_budget_tokens_and_ledgers_the_usage(store: Store) -> None:
    tok = bucket("t", 10_000, "tokens")
    await store.reserve(req("r1", 500, (30, 1000), tok))
    await store.commit("r1", 500, TokenUsage(), NOW + 1, tokens=(30, 1000))
    assert (await store.bucket_states([tok], NOW + 1))[0].spent == 1030
    rows = await store.ledger_rows(int(NOW) // 3600 * 3600, int(NOW) // 3600 * 3600 + 3600)
    assert [(r.cost, r.requests, r.input_tokens, r.output_tokens) for r in rows] == [(500, 1, 0, 0)]


async def test_requests_bucket_admits_exactly_its_limit(store: Store) -> None:
    rq = bucket("q", 10, "requests")
    results = await asyncio.gather(*(store.reserve(req(f"r{i}", 7, (5, 5), rq)) for i in range(40)))
    admitted = [r for r in results if r.admitted]
    assert len(admitted) == 10
    assert [r.failed for r in results if not r.admitted] == [(0,)] * 30
    assert (await store.bucket_states([rq], NOW))[0].reserved == 10


async def test_a_full_token_bucket_refuses_and_holds_nothing_elsewhere(store: Store) -> None:
    usd, tok = bucket("u", 10_000, "usd"), bucket("t", 100, "tokens")
    assert (await store.reserve(req("r1", 10, (40, 40), usd, tok))).admitted
    refused = await store.reserve(req("r2", 10, (10, 11), usd, tok))
    assert not refused.admitted and refused.failed == (1,)
    states = await store.bucket_states([usd, tok], NOW)
    assert [s.reserved for s in states] == [10, 80]
    # Exactly reaching the limit is allowed (inclusive boundary), in tokens too.
    assert (await store.reserve(req("r3", 10, (10, 10), usd, tok))).admitted


async def test_expiry_charges_each_bucket_its_estimate_and_a_late_commit_corrects_it(
    store: Store,
) -> None:
    usd, tok, rq = (
        bucket("u", 10_000, "usd"),
        bucket("t", 10_000, "tokens"),
        bucket("q", 10, "requests"),
    )
    await store.reserve(req("r1", 500, (30, 70), usd, tok, rq, ttl=10))
    assert await store.settle_expired(NOW + 11) == 1
    states = await store.bucket_states([usd, tok, rq], NOW + 11)
    assert [(s.spent, s.reserved) for s in states] == [(500, 0), (100, 0), (1, 0)]
    late = await store.commit("r1", 200, TokenUsage(10, 20), NOW + 12)
    assert late.status == "late"
    states = await store.bucket_states([usd, tok, rq], NOW + 12)
    # The request still counts once.
    assert [(s.spent, s.reserved) for s in states] == [(200, 0), (30, 0), (1, 0)]


async def test_optimistic_token_bucket_admits_below_its_limit_and_holds_nothing(
    store: Store,
) -> None:
    tok = bucket("t", 100, "tokens")
    assert (await store.reserve(req("r1", 1, (500, 500), tok, mode="optimistic"))).admitted
    assert (await store.bucket_states([tok], NOW))[0].reserved == 0
    await store.commit("r1", 1, TokenUsage(60, 60), NOW)
    assert not (await store.reserve(req("r2", 1, (1, 1), tok, mode="optimistic"))).admitted


async def test_reservation_record_keeps_the_token_estimate(store: Store) -> None:
    await store.reserve(req("r1", 500, (30, 70), bucket("t", 10_000, "tokens")))
    record = await store.reservation("r1")
    assert record is not None and record.estimate == 500 and record.tokens == (30, 70)


async def test_rolling_token_window_frees_what_ages_out(store: Store) -> None:
    # A 10-second window of 1-second slots: spend in slot s counts while since <= s.
    first = bucket("t", 100, "tokens", slot=SLOT, since=SLOT - 9)
    await store.reserve(req("r1", 1, (50, 50), first))
    await store.commit("r1", 1, TokenUsage(50, 50), NOW)
    later = bucket("t", 100, "tokens", slot=SLOT + 9, since=SLOT)
    assert not (await store.reserve(req("r2", 1, (1, 0), later, now=NOW + 9))).admitted
    aged = bucket("t", 100, "tokens", slot=SLOT + 10, since=SLOT + 1)
    assert (await store.reserve(req("r3", 1, (1, 0), aged, now=NOW + 10))).admitted


async def test_redis_prunes_more_dead_one_second_slots_than_one_batch(redis_url: str) -> None:
    from redis.asyncio import Redis

    from sidecar.store.redis_store import RedisStore

    st = RedisStore(redis_url, prefix="prune-test:")
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        await flush_redis(redis_url)
        # 2,500 one-second slots of a rolling window, all dead 20 s after they began.
        spend = [
            (BucketView(f"burst{i % 5}", SLOT + s, SLOT - 1, 20, 10, measure="requests"), 1)
            for i in range(5)
            for s in range(500)
        ]
        assert await st.add_spend("m", spend)
        index = "prune-test:{n0}:slots"  # one Redis: one shard, node tag n0
        assert await client.zcard(index) == 2500
        await st.settle_expired(SLOT + 600)
        assert await client.zcard(index) == 0
        assert await client.hlen("prune-test:b:{o:burst0}:burst0") == 0
    finally:
        await client.aclose()
        await st.close()
