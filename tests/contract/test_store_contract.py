"""One contract for every store backend: the same tests run against SQLite and Redis."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from sidecar.model import TokenUsage
from sidecar.store.base import Store
from sidecar.store.budget_types import AdmissionMode, BucketView, ReserveRequest
from tests.support.reserve import reserve_request
from tests.support.store_clock import StoreClock

NOW = 1_800_000_000.0


def bucket(
    key: str = "b:r:alice",
    limit: int = 100,
    slot: int = 1_799_996_400,
    since: int = 1_799_996_400,
    enforce: bool = True,
) -> BucketView:
    return BucketView(
        key=key, slot=slot, since=since, ttl_seconds=90_000, limit=limit, enforce=enforce
    )


def req(
    rid: str,
    amount: int,
    *buckets: BucketView,
    now: float = NOW,
    mode: AdmissionMode = "reserve",
    ttl: float = 600,
) -> ReserveRequest:
    return reserve_request(rid, amount, *buckets, now=now, mode=mode, ttl=ttl)


async def test_docs_roundtrip(store: Store) -> None:
    assert await store.get_doc("tokens", "a", now=NOW) is None
    await store.put_doc("tokens", "a", {"name": "ci", "n": 1}, now=NOW)
    await store.put_doc("tokens", "b", {"name": "bot", "n": 2}, now=NOW)
    assert await store.get_doc("tokens", "a", now=NOW) == {"name": "ci", "n": 1}
    assert sorted(d["name"] for d in await store.list_docs("tokens", now=NOW)) == ["bot", "ci"]
    assert await store.delete_doc("tokens", "a") is True
    assert await store.delete_doc("tokens", "a") is False
    assert await store.get_doc("tokens", "a", now=NOW) is None


async def test_swap_doc_is_compare_and_set(store: Store) -> None:
    async def swap(expected: dict[str, str] | None, new: dict[str, str] | None) -> bool:
        return await store.swap_doc("codes", "x", expected, new, now=NOW)

    assert await swap(None, {"state": "pending"}) is True
    assert await swap(None, {"state": "pending"}) is False
    assert await swap({"state": "pending"}, {"state": "used"}) is True
    assert await swap({"state": "pending"}, {"state": "again"}) is False
    assert await swap({"state": "used"}, None) is True
    assert await store.get_doc("codes", "x", now=NOW) is None


async def test_doc_lives_until_its_ttl_has_passed(store: Store, store_clock: StoreClock) -> None:
    await store.put_doc("short", "k", {"v": 1}, ttl_seconds=60, now=store_clock())
    await store_clock.advance(50)
    assert await store.get_doc("short", "k", now=store_clock()) == {"v": 1}
    await store_clock.advance(10)
    assert await store.get_doc("short", "k", now=store_clock()) is None


async def test_incr_counts(store: Store) -> None:
    assert await store.incr("rl:1", 1, 60, now=NOW) == 1
    assert await store.incr("rl:1", 2, 60, now=NOW) == 3


async def test_reserve_within_limit_then_deny_inclusive_boundary(store: Store) -> None:
    b = bucket(limit=100)
    for i in range(10):
        result = await store.reserve(req(f"r{i}", 10, b))
        assert result.admitted, i
    assert (await store.bucket_states([b], NOW))[0].reserved == 100
    denied = await store.reserve(req("r10", 1, b))
    assert not denied.admitted and denied.failed == (0,)
    assert denied.states[0].reserved == 100


async def test_all_or_nothing_across_buckets(store: Store) -> None:
    roomy, tight = bucket("b:roomy", limit=1000), bucket("b:tight", limit=5)
    result = await store.reserve(req("r1", 10, roomy, tight))
    assert not result.admitted and result.failed == (1,)
    states = await store.bucket_states([roomy, tight], NOW)
    assert [s.reserved for s in states] == [0, 0]


async def test_monitor_bucket_never_denies_but_counts(store: Store) -> None:
    mon = bucket("b:mon", limit=5, enforce=False)
    assert (await store.reserve(req("r1", 10, mon))).admitted
    await store.commit("r1", 8, TokenUsage(10, 5), NOW + 1)
    assert (await store.bucket_states([mon], NOW))[0].spent == 8


async def test_commit_replaces_reservation_idempotently(store: Store) -> None:
    b = bucket(limit=100)
    await store.reserve(req("r1", 40, b))
    first = await store.commit("r1", 7, TokenUsage(100, 20), NOW + 2)
    assert first.status == "committed" and first.estimate == 40
    again = await store.commit("r1", 7, TokenUsage(100, 20), NOW + 3)
    assert again.status == "duplicate"
    state = (await store.bucket_states([b], NOW + 3))[0]
    assert (state.spent, state.reserved) == (7, 0)
    assert (await store.commit("nope", 5, TokenUsage(), NOW)).status == "unknown"


async def test_duplicate_reserve_changes_nothing(store: Store) -> None:
    b = bucket(limit=100)
    assert (await store.reserve(req("r1", 40, b))).admitted
    dup = await store.reserve(req("r1", 40, b))
    assert dup.duplicate
    assert (await store.bucket_states([b], NOW))[0].reserved == 40


async def test_open_id_reused_for_another_request_is_refused(store: Store) -> None:
    b = bucket(limit=1000)
    mine = replace(req("r1", 40, b), binding="alice|gpt-4o-mini|40")
    assert (await store.reserve(mine)).admitted
    theirs = await store.reserve(replace(req("r1", 900, b), binding="mallory|gpt-4o|900"))
    assert not theirs.admitted and theirs.conflict
    assert (await store.bucket_states([b], NOW))[0].reserved == 40
    assert (await store.reserve(mine)).duplicate


async def test_reservation_record_names_what_was_admitted(store: Store) -> None:
    b = bucket(limit=1000)
    await store.reserve(req("r1", 40, b))
    found = await store.reservation("r1")
    assert found is not None
    assert (found.state, found.estimate, found.dims) == ("open", 40, req("r1", 40, b).dims)
    await store.commit("r1", 10, TokenUsage(), NOW)
    assert (await store.reservation("r1")).state == "committed"  # type: ignore[union-attr]
    assert await store.reservation("nope") is None


async def test_expired_reservation_is_charged_its_estimate(store: Store) -> None:
    b = bucket(limit=100)
    await store.reserve(req("r1", 30, b, ttl=60))
    assert await store.settle_expired(NOW + 30) == 0
    assert await store.settle_expired(NOW + 61) == 1
    state = (await store.bucket_states([b], NOW + 61))[0]
    assert (state.spent, state.reserved) == (30, 0)
    # A completion arriving after expiry corrects the charge to the actual cost, once.
    late = await store.commit("r1", 12, TokenUsage(5, 5), NOW + 70)
    assert late.status == "late"
    assert (await store.commit("r1", 12, TokenUsage(5, 5), NOW + 71)).status == "duplicate"
    assert (await store.bucket_states([b], NOW + 71))[0].spent == 12


async def test_reserve_settles_expired_reservations_first(store: Store) -> None:
    b = bucket(limit=50)
    await store.reserve(req("r1", 50, b, ttl=10))
    result = await store.reserve(req("r2", 1, b, now=NOW + 20))
    # r1 expired and now counts as spent 50: no room left for r2.
    assert not result.admitted
    assert result.states[0].spent == 50 and result.states[0].reserved == 0


async def test_slots_since_bounds_the_window(store: Store) -> None:
    # One bucket key is one kind of window throughout (its rule's): a rolling one here.
    old = bucket("b:roll", limit=100, slot=1000, since=500)
    await store.reserve(req("r1", 60, old))
    await store.commit("r1", 60, TokenUsage(1, 1), NOW)
    later = bucket("b:roll", limit=100, slot=2000, since=1500)
    states = await store.bucket_states([later], NOW)
    assert states[0].spent == 0
    assert (await store.reserve(req("r2", 100, later))).admitted
    same = bucket("b:roll", limit=100, slot=2000, since=1000)
    assert (await store.bucket_states([same], NOW))[0].slots == {1000: 60}


async def test_optimistic_admits_while_spent_below_limit(store: Store) -> None:
    b = bucket(limit=10)
    assert (await store.reserve(req("r1", 1000, b, mode="optimistic"))).admitted
    assert (await store.bucket_states([b], NOW))[0].reserved == 0
    await store.commit("r1", 10, TokenUsage(1, 1), NOW)
    assert not (await store.reserve(req("r2", 1, b, mode="optimistic"))).admitted


async def test_concurrent_reservations_never_overshoot(store: Store) -> None:
    b = bucket(limit=100)
    results = await asyncio.gather(*(store.reserve(req(f"c{i}", 10, b)) for i in range(40)))
    assert sum(r.admitted for r in results) == 10
    assert (await store.bucket_states([b], NOW))[0].reserved == 100


async def test_ledger_aggregates_commits_by_hour(store: Store) -> None:
    b = bucket(limit=10_000)
    for i in range(3):
        await store.reserve(req(f"l{i}", 50, b))
        await store.commit(f"l{i}", 20 + i, TokenUsage(100, 10, cache_read_tokens=5), NOW + i)
    await store.commit("l0", 20, TokenUsage(100, 10), NOW)  # duplicate: not counted
    hour = int(NOW) // 3600 * 3600
    rows = await store.ledger_rows(hour, hour + 3600)
    assert len(rows) == 1
    row = rows[0]
    assert (row.cost, row.requests, row.input_tokens, row.output_tokens) == (63, 3, 315, 30)
    assert row.dims.user == "alice@example.com" and row.dims.groups == ("ml",)
    assert await store.ledger_rows(hour + 3600, hour + 7200) == []


async def test_add_spend_applies_once_per_marker(store: Store) -> None:
    first, second = bucket("b:bf:1", limit=100), bucket("b:bf:2", limit=100)
    assert await store.add_spend("rule-a", [(first, 30), (second, 5)]) is True
    assert await store.add_spend("rule-a", [(first, 30), (second, 5)]) is False
    states = await store.bucket_states([first, second], NOW)
    assert [s.spent for s in states] == [30, 5]
    # Backfilled spend counts against the limit like any other.
    assert not (await store.reserve(req("r1", 71, first))).admitted
    assert (await store.reserve(req("r2", 70, first))).admitted


async def test_error_commit_releases_the_reservation_at_zero_and_counts_an_error(
    store: Store,
) -> None:
    b = bucket(limit=100)
    await store.reserve(req("e1", 40, b))
    result = await store.commit("e1", 0, TokenUsage(), NOW + 1, error=True)
    assert (result.status, result.estimate) == ("committed", 40)
    state = (await store.bucket_states([b], NOW + 1))[0]
    assert (state.spent, state.reserved) == (0, 0)
    # Idempotent like any commit: a retried error changes nothing.
    assert (await store.commit("e1", 0, TokenUsage(), NOW + 2, error=True)).status == "duplicate"
    await store.reserve(req("ok1", 40, b))
    await store.commit("ok1", 25, TokenUsage(10, 5), NOW + 3)
    hour = int(NOW) // 3600 * 3600
    [row] = await store.ledger_rows(hour, hour + 3600)
    assert (row.cost, row.requests, row.errors) == (25, 2, 1)


async def test_error_with_usage_is_charged_that_usage(store: Store) -> None:
    b = bucket(limit=100)
    await store.reserve(req("e2", 40, b))
    await store.commit("e2", 7, TokenUsage(10, 2), NOW + 1, error=True)
    assert (await store.bucket_states([b], NOW + 1))[0].spent == 7
    hour = int(NOW) // 3600 * 3600
    [row] = await store.ledger_rows(hour, hour + 3600)
    assert (row.cost, row.requests, row.errors, row.input_tokens) == (7, 1, 1, 10)


async def test_error_after_expiry_refunds_the_estimate(store: Store) -> None:
    b = bucket(limit=100)
    await store.reserve(req("e3", 30, b, ttl=60))
    assert await store.settle_expired(NOW + 61) == 1
    assert (await store.commit("e3", 0, TokenUsage(), NOW + 70, error=True)).status == "late"
    assert (await store.bucket_states([b], NOW + 70))[0].spent == 0
    hour = int(NOW) // 3600 * 3600
    [row] = await store.ledger_rows(hour, hour + 3600)
    assert (row.cost, row.requests, row.errors) == (0, 1, 1)
