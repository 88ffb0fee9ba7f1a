"""One Redis charges an access log batch in one call (commit_many.lua).

The call reads each bucket the batch's records share once and writes it once, at its end.
These tests hold it to what commits one by one leave behind, bucket by bucket and ledger
row by ledger row, over shared and own buckets, fixed and rolling windows, tokens, a
duplicate, an unknown id and a record that expired first; and show that a call failing
part-way writes what the records before the failure changed, so the repeated batch charges
each record once.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from devtools.redis_cluster import LocalCluster
from sidecar.model import TokenUsage
from sidecar.store.budget_types import (
    BucketView,
    Charge,
    CommitResult,
    Pricer,
    Reservation,
    ReserveRequest,
)
from sidecar.store.redis_store import RedisStore, _commit_args
from tests.contract.test_store_charge import ALICE, DAY, HOUR, NOW
from tests.support.redis_admin import flush_redis

TEAM = BucketView("daily|team=ml", DAY, DAY, 90_000, 1_000_000)
MODEL = BucketView("rolling|model=gpt-4o", DAY + 3600, DAY, 90_000, 1_000_000)
TOKENS = BucketView("daily-tokens|team=ml", DAY, DAY, 90_000, 1_000_000, measure="tokens")


def own(user: str) -> BucketView:
    return BucketView(f"daily|user={user}", DAY, DAY, 90_000, 1_000_000)


def request(rid: str, user: str, amount: int, ttl: float = 600) -> ReserveRequest:
    return ReserveRequest(
        rid,
        (own(user), TEAM, MODEL, TOKENS),
        amount,
        "reserve",
        NOW,
        NOW + ttl,
        dims=ALICE,
        tokens=(7, 9),
    )


def charges(ids: list[str]) -> list[tuple[str, Pricer]]:
    """Each id charged 100 µUSD plus than its index (an id named twice, twice differently)."""
    return [(rid, fixed(Charge(100 + n, TokenUsage(10 + n, 20 + n)))) for n, rid in enumerate(ids)]


def fixed(charge: Charge) -> Pricer:
    def price(_record: Reservation) -> Charge:
        return charge

    return price


# Six owners over three shards: a request naming all of them has parts on every shard.
WIDE = tuple(own(f"w{i}") for i in range(6))


@pytest.fixture
async def cluster_store(redis_cluster: LocalCluster) -> AsyncIterator[RedisStore]:
    """A store of its own on the emptied local cluster."""
    await flush_redis(redis_cluster.url)
    store = RedisStore(redis_cluster.url, prefix=f"many-{uuid.uuid4().hex[:8]}:")
    try:
        yield store
    finally:
        await store.close()


def new_store(redis_url: str) -> RedisStore:
    return RedisStore(redis_url, prefix=f"many-{uuid.uuid4().hex[:8]}:")


async def state(store: RedisStore, users: list[str]) -> list[tuple[int, int]]:
    views = [*(own(u) for u in users), TEAM, MODEL, TOKENS]
    return [(s.spent, s.reserved) for s in await store.bucket_states(views, NOW + 700)]


async def test_a_batch_leaves_what_commits_one_by_one_leave(redis_url: str) -> None:
    await flush_redis(redis_url)
    users = ["u0", "u1", "u2"]
    batched, single = new_store(redis_url), new_store(redis_url)
    try:
        ids = [f"r{i}" for i in range(20)]
        for store in (batched, single):
            for i, rid in enumerate(ids):
                short = rid == "r3"  # expires before it is charged
                admitted = await store.reserve(
                    request(rid, users[i % 3], 300, ttl=5 if short else 600)
                )
                assert admitted.admitted
            assert await store.settle_expired(NOW + 10) == 1
        # The batch repeats r5 (Envoy retrying a flush) and names an id never reserved.
        asked = [*ids[:10], "r5", "nope", *ids[10:]]
        priced = charges(asked)
        answers = await batched.charge_many(priced, NOW + 10)
        one_by_one: list[CommitResult] = []
        for rid, price in priced:
            one_by_one.append(await single.charge(rid, price, NOW + 10))
        statuses = [getattr(a, "status", a) for a in answers]
        assert statuses == [r.status for r in one_by_one]
        assert statuses[3] == "late" and statuses[10:12] == ["duplicate", "unknown"]
        assert statuses.count("committed") == 19
        assert [getattr(a, "estimate", a) for a in answers] == [r.estimate for r in one_by_one]
        assert await state(batched, users) == await state(single, users)
        # Every hold released, every charge in: 21 priced charges less the duplicate and the
        # unknown id, r3 corrected from its estimate to its charge.
        cost = sum(100 + n for n, rid in enumerate(asked) if rid != "nope") - (100 + 10)
        spent_team, held_team = (await state(batched, users))[3]
        assert (spent_team, held_team) == (cost, 0)
        rows = [
            (r.hour, r.dims, r.cost, r.requests, r.input_tokens, r.output_tokens)
            for r in await batched.ledger_rows(HOUR, HOUR + 3600)
        ]
        assert rows == [
            (r.hour, r.dims, r.cost, r.requests, r.input_tokens, r.output_tokens)
            for r in await single.ledger_rows(HOUR, HOUR + 3600)
        ]
        assert rows[0][2:4] == (cost, 20)
    finally:
        await batched.close()
        await single.close()


async def test_a_batch_failing_part_way_keeps_each_record_whole_and_can_be_repeated(
    redis_url: str,
) -> None:
    await flush_redis(redis_url)
    store = new_store(redis_url)
    client = Redis.from_url(redis_url)
    try:
        for rid, user in (("a", "u0"), ("b", "broken"), ("c", "u1")):
            assert (await store.reserve(request(rid, user, 300))).admitted
        # b's own bucket (its first) becomes a key of another type: its commit fails there,
        # before it changed anything.
        counters = store._key("counters", own("broken").key)
        await client.delete(counters)
        await client.rpush(counters, "x")

        price = fixed(Charge(100, TokenUsage(10, 20)))
        answers = await store.charge_many([("a", price), ("b", price), ("c", price)], NOW + 1)
        assert all(isinstance(a, Exception) for a in answers)
        # a was committed whole (its record, its shared buckets, its ledger row); b and c
        # still hold.
        record = await store.reservation("a")
        assert record is not None and record.state == "committed"
        assert await state(store, ["u0", "u1"]) == [
            (100, 0),
            (0, 300),
            (100, 600),
            (100, 600),
            (30, 32),
        ]
        [row] = await store.ledger_rows(HOUR, HOUR + 3600)
        assert (row.cost, row.requests) == (100, 1)
        # The store repeats what failed: a is a duplicate, c is charged once.
        again = await store.charge_many([("a", price), ("c", price)], NOW + 2)
        assert [getattr(a, "status", a) for a in again] == ["duplicate", "committed"]
        assert await state(store, ["u0", "u1"]) == [
            (100, 0),
            (100, 0),
            (200, 300),
            (200, 300),
            (60, 16),
        ]
    finally:
        await store.close()
        await client.aclose()


async def test_a_cluster_batch_commits_home_records_and_their_parts_on_other_shards(
    cluster_store: RedisStore,
) -> None:
    store = cluster_store
    # Ids as the store mints them (naming their home shard) and one from elsewhere
    # (found through its pointer).
    ids = [store.mint_request_id(WIDE), f"solo-{uuid.uuid4().hex}", store.mint_request_id(WIDE)]
    assert (await store.reserve(wide_request(ids[0], 100, ttl=600))).admitted
    assert (await store.reserve(request(ids[1], "solo", 300))).admitted
    # Past its expiry and not swept: its home shard answers "pending" in the batch,
    # and the store finishes it as commit() would (parts first).
    assert (await store.reserve(wide_request(ids[2], 50, ttl=5))).admitted
    answers = await store.charge_many(charges([*ids, "nope"]), NOW + 10)
    assert [getattr(a, "status", a) for a in answers] == [
        "committed",
        "committed",
        "committed",
        "unknown",
    ]
    # Each of the six buckets charged 100 and 102 once, every hold released; the solo
    # request's buckets 101.
    states = await store.bucket_states([*WIDE, own("solo")], NOW + 10)
    assert [(s.spent, s.reserved) for s in states] == [(202, 0)] * 6 + [(101, 0)]
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    assert (row.cost, row.requests) == (303, 3)
    again = await store.charge_many(charges(ids), NOW + 11)
    assert [getattr(a, "status", a) for a in again] == ["duplicate"] * 3
    states = await store.bucket_states([*WIDE, own("solo")], NOW + 11)
    assert [(s.spent, s.reserved) for s in states] == [(202, 0)] * 6 + [(101, 0)]


def wide_request(rid: str, amount: int, ttl: float) -> ReserveRequest:
    """A request naming every bucket of WIDE."""
    return ReserveRequest(rid, WIDE, amount, "reserve", NOW, NOW + ttl, dims=ALICE)


async def test_a_cluster_batch_settles_a_reservation_whose_part_a_sweep_expired_first(
    cluster_store: RedisStore,
) -> None:
    store = cluster_store
    rid = store.mint_request_id(WIDE)
    assert (await store.reserve(wide_request(rid, 100, ttl=5))).admitted
    home = await store._home_of(rid)
    tags = {store._shards.tag_of(store._key("bucket", b.key)) for b in WIDE}
    part = next(t for t in sorted(tags) if t != home)
    # Only the part's shard is swept, an hour past the expiry (a part whose home was not
    # swept is settled on its own then): the part is expired, its home still open.
    await store._settle_shard(part, NOW + 3_700, 100, 0)
    [answer] = await store.charge_many(charges([rid]), NOW + 3_701)
    # The whole reservation counts as expired, as one Redis's single sweep would have it,
    # and each bucket ends charged the actual 100 once.
    assert getattr(answer, "status", answer) == "late"
    states = await store.bucket_states(list(WIDE), NOW + 3_701)
    assert [(s.spent, s.reserved) for s in states] == [(100, 0)] * 6
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    assert (row.cost, row.requests) == (100, 1)


async def test_a_repeated_cluster_batch_commits_the_parts_an_earlier_charge_did_not_reach(
    cluster_store: RedisStore,
) -> None:
    store = cluster_store
    rid = store.mint_request_id(WIDE)
    assert (await store.reserve(wide_request(rid, 100, ttl=600))).admitted
    home = await store._home_of(rid)
    assert home is not None
    # An earlier charge committed the home record, then failed before its parts (as a
    # shard going down between the two would have it).
    charge = Charge(100, TokenUsage(10, 20))
    status, _, rest = await store._call(
        store._commit,
        [store._key("record", home, rid)],
        [*store._index_keys(home), *_commit_args(charge, NOW + 1), ""],
    )
    assert status == "committed" and rest
    held = [s.reserved for s in await store.bucket_states(list(WIDE), NOW + 1)]
    assert any(held)
    [answer] = await store.charge_many([(rid, fixed(charge))], NOW + 2)
    assert getattr(answer, "status", answer) == "duplicate"
    states = await store.bucket_states(list(WIDE), NOW + 2)
    assert [(s.spent, s.reserved) for s in states] == [(100, 0)] * 6
