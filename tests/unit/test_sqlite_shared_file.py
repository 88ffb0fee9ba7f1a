"""The SQLite store's bookkeeping as several processes on one file see it: expired
reservations are settled by whichever process reserves next, however recently it looked;
released holds and done reservations leave the tables at the housekeeping pass, not before.

Two stores on one file are two connections on two threads, which is what two `sidecar serve`
workers are to SQLite."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.model import TokenUsage
from sidecar.store.budget_types import BucketView, ReserveRequest
from sidecar.store.sqlite_store import SQLiteStore

NOW = 1_800_000_000.0
DAY = 1_799_971_200
WEEK = 7 * 24 * 3600


def view(key: str, limit: int = 50) -> BucketView:
    return BucketView(key, DAY, DAY, 93_600, limit)


def request(request_id: str, key: str, amount: int, at: float, ttl: float) -> ReserveRequest:
    return ReserveRequest(request_id, (view(key),), amount, "reserve", at, at + ttl)


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SQLiteStore, SQLiteStore]]:
    first, second = (SQLiteStore(f"sqlite:///{tmp_path}/shared.db") for _ in range(2))
    await first.open()
    await second.open()
    yield first, second
    await first.close()
    await second.close()


async def test_a_reservation_another_process_made_is_settled_by_the_next_reserve(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    first, second = stores
    # The second process has just reserved itself: the earliest expiry it saw was an hour
    # away, before the first process reserved for 10 seconds.
    assert (await second.reserve(request("own", "other", 1, NOW, 3600))).admitted
    assert (await first.reserve(request("r1", "b", 50, NOW, 10))).admitted
    refused = await second.reserve(request("r2", "b", 1, NOW + 20, 600))
    # r1 expired into its estimate: 50 spent, nothing held, no room for r2.
    assert not refused.admitted
    assert (refused.states[0].spent, refused.states[0].reserved) == (50, 0)
    record = await first.reservation("r1")
    assert record is not None and record.state == "expired"
    [row] = await first.ledger_rows(0, 2**40)
    assert (row.cost, row.requests) == (50, 1)


async def test_holds_released_to_zero_leave_the_table_at_the_settle_pass(
    stores: tuple[SQLiteStore, SQLiteStore], tmp_path: Path
) -> None:
    first, second = stores
    for n, store in enumerate(stores):
        assert (await store.reserve(request(f"r{n}", "b", 20, NOW, 600))).admitted
    assert (await first.commit("r0", 5, TokenUsage(), NOW)).status == "committed"

    def holds() -> dict[str, int]:
        with sqlite3.connect(tmp_path / "shared.db") as conn:
            return dict(conn.execute("SELECT bucket, amount FROM reserved").fetchall())

    assert holds() == {"b": 20}
    assert (await second.commit("r1", 5, TokenUsage(), NOW)).status == "committed"
    # Released to 0 by the commit, still a row until the pass: it counts as nothing held.
    assert holds() == {"b": 0}
    [state] = await first.bucket_states([view("b")], NOW)
    assert (state.spent, state.reserved) == (10, 0)
    await second.settle_expired(NOW + 1)
    assert holds() == {}
    assert (await first.reserve(request("r2", "b", 40, NOW + 2, 600))).admitted
    assert holds() == {"b": 40}


async def test_done_reservations_are_kept_a_week_after_their_expiry(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    first, second = stores
    assert (await first.reserve(request("r1", "b", 10, NOW, 3600))).admitted
    assert (await first.commit("r1", 4, TokenUsage(), NOW + 5)).status == "committed"
    expiry = NOW + 3600
    await second.settle_expired(expiry + WEEK - 1)
    # Still known: a replayed completion is a duplicate, not a new charge.
    assert (await second.commit("r1", 4, TokenUsage(), expiry + WEEK - 1)).status == "duplicate"
    await second.settle_expired(expiry + WEEK + 1)
    assert await first.reservation("r1") is None
