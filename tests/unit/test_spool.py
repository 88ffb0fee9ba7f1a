"""The fail-open spool: charges kept while the budget store was unreachable are replayed into
the store once it is back, each exactly once, in the amounts the request really cost."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from sidecar.budget.spool import Spool
from sidecar.model import TokenUsage
from sidecar.store.base import StoreUnavailable
from sidecar.store.budget_types import (
    BucketView,
    CommitResult,
    LedgerDims,
    LedgerPart,
    ReserveRequest,
    ReserveResult,
)
from sidecar.store.sqlite_store import SQLiteStore

NOW = 1_800_000_000.0
HOUR = int(NOW) // 3600 * 3600
DAY = 1_799_971_200
ALICE = LedgerDims("alice@example.com", ("ml",), "", "user", "gpt-4o", "openai")
USD = BucketView("b:usd:alice", DAY, DAY, 90_000, 1_000)
TOKENS = BucketView("b:tok:alice", DAY, DAY, 90_000, 10, measure="tokens")


def admitted(
    request_id: str,
    estimate: int = 500,
    tokens: tuple[int, int] = (30, 70),
    expires_at: float = NOW + 600,
) -> ReserveRequest:
    # Limits far below the amounts: a replayed charge is counted, never refused.
    return ReserveRequest(
        request_id, (USD, TOKENS), estimate, "reserve", NOW, expires_at, ALICE, tokens=tokens
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    st = SQLiteStore(f"sqlite:///{tmp_path}/store.db")
    await st.open()
    yield st
    await st.close()


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    sp = Spool(str(tmp_path / "spool.db"))
    yield sp
    await sp.close()


async def spent(store: SQLiteStore) -> list[int]:
    return [s.spent for s in await store.bucket_states([USD, TOKENS], NOW)]


async def test_a_completed_admission_is_reserved_and_charged_its_actual_cost(
    store: SQLiteStore, spool: Spool
) -> None:
    await spool.admitted(admitted("r1"))
    await spool.completed("r1", 321, TokenUsage(input_tokens=12, output_tokens=8))
    assert await spool.replay(store, NOW) == 1
    assert await spent(store) == [321, 20]
    record = await store.reservation("r1")
    assert record is not None and record.state == "committed" and record.estimate == 500
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    assert (row.dims, row.cost, row.requests, row.input_tokens, row.output_tokens, row.errors) == (
        ALICE,
        321,
        1,
        12,
        8,
        0,
    )
    assert await spool.size() == 0


async def test_replay_is_exactly_once(store: SQLiteStore, spool: Spool) -> None:
    await spool.admitted(admitted("r1"))
    await spool.completed("r1", 321, TokenUsage(12, 8))
    assert await spool.replay(store, NOW) == 1
    assert await spool.replay(store, NOW + 1) == 0
    # The same charge spooled again (the process died before forgetting it) is a duplicate
    # for the store: nothing is charged twice.
    await spool.admitted(admitted("r1"))
    await spool.completed("r1", 321, TokenUsage(12, 8))
    assert await spool.replay(store, NOW + 2) == 1
    assert await spent(store) == [321, 20]
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    assert (row.cost, row.requests) == (321, 1)


async def test_an_admission_never_completed_waits_for_its_expiry_then_pays_its_estimate(
    store: SQLiteStore, spool: Spool
) -> None:
    await spool.admitted(admitted("r1", estimate=500, tokens=(30, 70), expires_at=NOW + 600))
    assert await spool.replay(store, NOW + 599) == 0
    assert await spool.size() == 1
    assert await spent(store) == [0, 0]
    assert await spool.replay(store, NOW + 600) == 1
    # µUSD buckets pay the estimate, token buckets the estimated tokens.
    assert await spent(store) == [500, 100]
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    assert (row.cost, row.requests, row.errors) == (500, 1, 0)


async def test_a_completion_whose_reservation_reached_the_store_commits_it(
    store: SQLiteStore, spool: Spool
) -> None:
    assert (await store.reserve(admitted("r1", estimate=100, tokens=(2, 3)))).admitted
    await spool.completed("r1", 42, TokenUsage(1, 2), error=True, tokens=(5, 6))
    assert await spool.replay(store, NOW) == 1
    # The token budget is charged the given tokens, the ledger the usage's own.
    assert await spent(store) == [42, 11]
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    assert (row.cost, row.input_tokens, row.output_tokens, row.errors) == (42, 1, 2, 1)


class FailingOnce:
    """The real store, unreachable for its `n`-th commit only (counting from 0)."""

    def __init__(self, store: SQLiteStore, n: int) -> None:
        self._store = store
        self._left = n

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        return await self._store.reserve(request)

    async def commit(
        self,
        request_id: str,
        actual_micros: int,
        usage: TokenUsage,
        now: float,
        error: bool = False,
        others: Sequence[LedgerPart] = (),
        tokens: tuple[int, int] | None = None,
    ) -> CommitResult:
        self._left -= 1
        if self._left == -1:
            raise StoreUnavailable("down again")
        return await self._store.commit(
            request_id, actual_micros, usage, now, error, others, tokens
        )


async def test_replay_stops_at_the_first_failure_and_keeps_what_is_left(
    store: SQLiteStore, spool: Spool
) -> None:
    for n in range(3):
        await spool.admitted(admitted(f"r{n}"))
        await spool.completed(f"r{n}", 100, TokenUsage(1, 1))
    # The third entry would go through, but replay keeps the order it was spooled in.
    flaky = FailingOnce(store, 1)
    assert await spool.replay(flaky, NOW) == 1  # type: ignore[arg-type]
    assert await spool.size() == 2
    assert await spool.has("r0") is False and await spool.has("r1") is True
    assert await spool.replay(store, NOW) == 2
    assert (await spent(store))[0] == 300


async def test_replay_takes_at_most_limit_entries(store: SQLiteStore, spool: Spool) -> None:
    for n in range(3):
        await spool.completed(f"r{n}", 1, TokenUsage())
        assert (await store.reserve(admitted(f"r{n}", estimate=100, tokens=(1, 1)))).admitted
    assert await spool.replay(store, NOW, limit=2) == 2
    assert await spool.size() == 1


async def test_a_spool_written_by_an_older_version_still_replays(
    store: SQLiteStore, tmp_path: Path
) -> None:
    # Before the `error` column, and when buckets were µUSD only (views a plain list).
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE spool (request_id TEXT PRIMARY KEY, views TEXT, dims TEXT, "
        "estimate INTEGER NOT NULL, expires_at REAL NOT NULL, actual INTEGER, "
        "usage TEXT, created_at REAL NOT NULL)"
    )
    views = json.dumps([[USD.key, USD.slot, USD.since, USD.ttl_seconds, USD.limit]])
    dims = json.dumps(
        [ALICE.user, list(ALICE.groups), ALICE.token, ALICE.kind, ALICE.model, ALICE.provider]
    )
    conn.execute(
        "INSERT INTO spool VALUES ('old', ?, ?, 700, ?, 650, ?, 0)",
        (views, dims, NOW + 600, json.dumps([3, 4, 0, 0])),
    )
    conn.commit()
    conn.close()
    spool = Spool(str(path))
    try:
        assert await spool.replay(store, NOW) == 1
    finally:
        await spool.close()
    [state] = await store.bucket_states([USD], NOW)
    assert state.spent == 650
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    assert (row.dims, row.cost, row.input_tokens, row.output_tokens) == (ALICE, 650, 3, 4)
