"""The store contract of `charge`: the reservation read, priced and committed as one step."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.model import TokenUsage
from sidecar.store.base import Store
from sidecar.store.budget_types import (
    BucketView,
    Charge,
    CommitResult,
    LedgerDims,
    LedgerPart,
    Reservation,
    ReserveRequest,
)

NOW = 1_800_000_000.0
HOUR = int(NOW) // 3600 * 3600
DAY = 1_799_971_200  # NOW's UTC day
ALICE = LedgerDims("alice@example.com", ("ml",), "", "user", "gpt-4o", "openai")


def bucket(key: str = "b:r:alice", measure: str = "usd") -> BucketView:
    return BucketView(key=key, slot=DAY, since=DAY, ttl_seconds=90_000, limit=1000, measure=measure)  # type: ignore[arg-type]


def req(rid: str, amount: int, *buckets: BucketView, ttl: float = 600) -> ReserveRequest:
    return ReserveRequest(
        request_id=rid,
        buckets=tuple(buckets),
        amount=amount,
        mode="reserve",
        now=NOW,
        expires_at=NOW + ttl,
        dims=ALICE,
        tokens=(7, 9),
    )


class Pricer:
    """Charges what it is told to, and keeps the records it was shown."""

    def __init__(self, charge: Charge | None) -> None:
        self.charge = charge
        self.seen: list[Reservation] = []

    def __call__(self, record: Reservation) -> Charge | None:
        self.seen.append(record)
        return self.charge


async def spent_reserved(store: Store, b: BucketView) -> tuple[int, int]:
    state = (await store.bucket_states([b], NOW))[0]
    return state.spent, state.reserved


async def test_charge_prices_the_reservation_record_and_commits_it(store: Store) -> None:
    money, tokens = bucket(), bucket("b:t:alice", "tokens")
    await store.reserve(req("r1", 40, money, tokens))
    price = Pricer(Charge(12, TokenUsage(3, 4), tokens=(3, 5)))
    result = await store.charge("r1", price, NOW)
    assert (result.status, result.estimate) == ("committed", 40)
    assert price.seen == [Reservation("r1", "open", 40, ALICE, (7, 9))]
    assert await spent_reserved(store, money) == (12, 0)
    assert await spent_reserved(store, tokens) == (8, 0)
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    assert (row.dims, row.cost, row.requests, row.input_tokens, row.output_tokens, row.errors) == (
        ALICE,
        12,
        1,
        3,
        4,
        0,
    )


async def test_charge_replayed_is_a_duplicate_and_charges_nothing_more(store: Store) -> None:
    b = bucket()
    await store.reserve(req("r1", 40, b))
    price = Pricer(Charge(12, TokenUsage(3, 4)))
    assert (await store.charge("r1", price, NOW)).status == "committed"
    again = await store.charge("r1", price, NOW)
    assert (again.status, again.estimate) == ("duplicate", 40)
    assert await spent_reserved(store, b) == (12, 0)
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    assert (row.cost, row.requests) == (12, 1)


async def test_charge_of_an_unknown_id_prices_nothing(store: Store) -> None:
    price = Pricer(Charge(12, TokenUsage()))
    assert (await store.charge("nope", price, NOW)).status == "unknown"
    assert price.seen == []
    assert await store.ledger_rows(HOUR, HOUR + 3600) == []


async def test_charge_priced_at_nothing_leaves_the_reservation_held(store: Store) -> None:
    b = bucket()
    await store.reserve(req("r1", 40, b))
    assert (await store.charge("r1", Pricer(None), NOW)).status == "unknown"
    assert await spent_reserved(store, b) == (0, 40)
    assert (await store.reservation("r1")).state == "open"  # type: ignore[union-attr]


async def test_charge_whose_pricing_fails_changes_nothing(store: Store) -> None:
    b = bucket()
    await store.reserve(req("r1", 40, b))

    def refuse(record: Reservation) -> Charge | None:
        raise ValueError("admitted for another model")

    with pytest.raises(ValueError, match="another model"):
        await store.charge("r1", refuse, NOW)
    assert await spent_reserved(store, b) == (0, 40)
    assert (await store.charge("r1", Pricer(Charge(5, TokenUsage())), NOW)).status == "committed"
    assert await spent_reserved(store, b) == (5, 0)


async def test_charges_at_once_are_each_their_own_when_one_fails(store: Store) -> None:
    # Queued together (SQLite may run them in one transaction): a failure is undone alone.
    b = bucket()
    for rid in ("r1", "r2", "r3"):
        await store.reserve(req(rid, 40, b))

    def refuse(record: Reservation) -> Charge | None:
        raise ValueError("no")

    results = await asyncio.gather(
        store.charge("r1", Pricer(Charge(10, TokenUsage())), NOW),
        store.charge("r2", refuse, NOW),
        store.charge("r3", Pricer(Charge(20, TokenUsage())), NOW),
        return_exceptions=True,
    )
    assert [getattr(r, "status", type(r).__name__) for r in results] == [
        "committed",
        "ValueError",
        "committed",
    ]
    assert await spent_reserved(store, b) == (30, 40)


async def test_charge_after_expiry_charges_the_difference(store: Store) -> None:
    b = bucket()
    await store.reserve(req("r1", 30, b, ttl=60))
    assert await store.settle_expired(NOW + 61) == 1
    price = Pricer(Charge(12, TokenUsage(5, 5), error=True, others=(LedgerPart(ALICE, 2, 1, 1),)))
    late = await store.charge("r1", price, NOW + 70)
    assert (late.status, late.estimate) == ("late", 30)
    assert price.seen[0].state == "expired"
    assert await spent_reserved(store, b) == (12, 0)
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    # The estimate booked at expiry, corrected to the charge; the part booked under its own
    # dimensions (here the same ones) adds its cost back: 30 + (12 - 30 - 2) + 2.
    assert (row.cost, row.requests, row.errors) == (12, 1, 1)


async def test_charge_many_answers_each_in_order_and_a_failure_alone(store: Store) -> None:
    b = bucket()
    for rid in ("r1", "r2", "r3"):
        await store.reserve(req(rid, 40, b))
    assert (await store.charge("r3", Pricer(Charge(1, TokenUsage())), NOW)).status == "committed"

    def refuse(record: Reservation) -> Charge | None:
        raise ValueError("no")

    answers = await store.charge_many(
        [
            ("r1", Pricer(Charge(10, TokenUsage()))),
            ("r2", refuse),
            ("nope", Pricer(None)),
            ("r3", Pricer(Charge(20, TokenUsage()))),
        ],
        NOW,
    )
    assert [getattr(a, "status", type(a).__name__) for a in answers] == [
        "committed",
        "ValueError",
        "unknown",
        "duplicate",
    ]
    # r1 charged 10, r3 its first 1 only, r2 still held.
    assert await spent_reserved(store, b) == (11, 40)
    # r2 was left open, as if its charge had never been tried: it is charged next time.
    [again] = await store.charge_many([("r2", Pricer(Charge(5, TokenUsage())))], NOW)
    assert getattr(again, "status", again) == "committed"
    assert await spent_reserved(store, b) == (16, 0)
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    assert (row.cost, row.requests) == (16, 3)


async def test_charge_many_of_open_expired_and_unpriced_reservations_in_one_batch(
    store: Store,
) -> None:
    b = bucket()
    await store.reserve(req("late", 30, b, ttl=60))
    assert await store.settle_expired(NOW + 61) == 1
    for rid in ("ok", "unpriced"):
        await store.reserve(req(rid, 40, b))
    late_price = Pricer(Charge(12, TokenUsage(5, 5)))
    answers = await store.charge_many(
        [
            ("late", late_price),
            ("unpriced", Pricer(None)),
            ("ok", Pricer(Charge(7, TokenUsage(1, 1)))),
            ("ok", Pricer(Charge(7, TokenUsage(1, 1)))),
            ("late", late_price),
        ],
        NOW + 70,
    )
    assert [(a.status, a.estimate) for a in answers if isinstance(a, CommitResult)] == [
        ("late", 30),
        ("unknown", 0),
        ("committed", 40),
        ("duplicate", 40),
        ("duplicate", 30),
    ]
    assert late_price.seen[0].state == "expired"
    # The late charge corrected its estimate to 12; "unpriced" still holds its 40.
    assert await spent_reserved(store, b) == (19, 40)
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    assert (row.cost, row.requests) == (19, 2)
    # Left open: charged when a price comes.
    [again] = await store.charge_many([("unpriced", Pricer(Charge(3, TokenUsage())))], NOW + 71)
    assert isinstance(again, CommitResult) and again.status == "committed"
    assert await spent_reserved(store, b) == (22, 0)


async def test_charge_many_books_the_ledger_as_each_charge_alone_would(store: Store) -> None:
    # The calls of a batch share their ledger rows; a part moved to other dimensions
    # (a fallback's, say) lands in its own row, in the same hour.
    b = bucket()
    bob = LedgerDims("bob@example.com", ("eng",), "", "user", "gpt-4o-mini", "openai")
    ids = [f"r{i}" for i in range(40)]
    for rid in ids:
        await store.reserve(req(rid, 20, b))  # 800 of the bucket's 1000
    charges = [
        (
            rid,
            Pricer(
                Charge(
                    i + 1,
                    TokenUsage(i, 2 * i),
                    error=i % 5 == 0,
                    others=(LedgerPart(bob, 1, 1, 0),) if i % 4 == 0 else (),
                )
            ),
        )
        for i, rid in enumerate(ids)
    ]
    answers = await store.charge_many(charges, NOW)
    assert [getattr(a, "status", a) for a in answers] == ["committed"] * 40
    rows = {row.dims.user: row for row in await store.ledger_rows(HOUR, HOUR + 3600)}
    assert set(rows) == {"alice@example.com", "bob@example.com"}
    alice, moved = rows["alice@example.com"], rows["bob@example.com"]
    assert (alice.cost, alice.requests, alice.errors) == (sum(range(1, 41)) - 10, 40, 8)
    assert (alice.input_tokens, alice.output_tokens) == (sum(range(40)), 2 * sum(range(40)))
    assert (moved.cost, moved.requests, moved.input_tokens, moved.output_tokens) == (10, 0, 10, 0)
    assert await spent_reserved(store, b) == (sum(range(1, 41)), 0)


async def test_charge_many_of_more_than_one_step_holds_charges_each_once(store: Store) -> None:
    b = bucket()
    ids = [f"r{i}" for i in range(150)]
    for rid in ids:
        await store.reserve(req(rid, 2, b))
    answers = await store.charge_many([(rid, Pricer(Charge(1, TokenUsage()))) for rid in ids], NOW)
    assert [getattr(a, "status", a) for a in answers] == ["committed"] * 150
    assert await spent_reserved(store, b) == (150, 0)
    assert await store.charge_many([], NOW) == []


async def test_charge_many_with_an_id_twice_charges_it_once(store: Store) -> None:
    # Envoy may send a record again (a retried flush): in one batch, the second is a replay.
    b = bucket()
    await store.reserve(req("r1", 40, b))
    price = Pricer(Charge(12, TokenUsage(3, 4)))
    answers = await store.charge_many([("r1", price), ("r1", price)], NOW)
    assert [getattr(a, "status", a) for a in answers] == ["committed", "duplicate"]
    assert await spent_reserved(store, b) == (12, 0)
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    assert (row.cost, row.requests) == (12, 1)
