"""Databases written with the earlier budget tables (slots and holds in rowid tables, an index
on reservations.created_at) open with their spend, holds and open reservations intact, and
gain the current tables, even when several processes open them at once."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from sidecar.model import TokenUsage
from sidecar.store.budget_types import BucketView, LedgerDims, ReserveRequest
from sidecar.store.sqlite_store import SQLiteStore

HOUR = 1_799_996_400
# The budget tables as the previous version created them, with one bucket that has 30 spent
# and 40 held by the open reservation r0.
OLD_TABLES = f"""
CREATE TABLE slots (bucket TEXT NOT NULL, slot INTEGER NOT NULL,
  amount INTEGER NOT NULL, expires_at INTEGER NOT NULL, PRIMARY KEY (bucket, slot));
CREATE TABLE reserved (bucket TEXT PRIMARY KEY, amount INTEGER NOT NULL);
CREATE TABLE reservations (
  request_id TEXT PRIMARY KEY, state TEXT NOT NULL, estimate INTEGER NOT NULL,
  held INTEGER NOT NULL, expires_at REAL NOT NULL, created_at REAL NOT NULL,
  buckets TEXT NOT NULL, dims TEXT NOT NULL, binding TEXT NOT NULL DEFAULT '',
  input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0);
CREATE INDEX reservations_open ON reservations (state, expires_at);
CREATE INDEX reservations_created ON reservations (created_at);
CREATE INDEX slots_expiry ON slots (expires_at);
INSERT INTO slots VALUES ('b', {HOUR}, 30, {HOUR + 90_000});
INSERT INTO slots VALUES ('other', {HOUR}, 7, {HOUR + 90_000});
INSERT INTO reserved VALUES ('b', 40);
INSERT INTO reservations VALUES ('r0', 'open', 40, 40, {HOUR + 600}, {HOUR + 1},
  '[["b", {HOUR}, {HOUR + 90_000}, "usd", 40, 40]]',
  '["a@x", ["ml"], "", "user", "gpt-4o", "openai"]', 'bind', 0, 0);
"""
VIEW = BucketView("b", HOUR, HOUR, 90_000, 100)
DIMS = LedgerDims("a@x", ("ml",), "", "user", "gpt-4o", "openai")


def old_database(tmp_path: Path) -> Path:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_TABLES)
    return path


def schema(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT name, COALESCE(sql, '') FROM sqlite_master").fetchall())


def reserve(request_id: str, amount: int) -> ReserveRequest:
    return ReserveRequest(
        request_id, (VIEW,), amount, "reserve", HOUR + 10.0, HOUR + 600.0, DIMS, "bind"
    )


async def test_old_budget_tables_keep_spend_holds_and_open_reservations(tmp_path: Path) -> None:
    path = old_database(tmp_path)
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    try:
        tables = schema(path)
        assert "WITHOUT ROWID" in tables["slots"] and "WITHOUT ROWID" in tables["reserved"]
        assert "slots_expiry" in tables and "reservations_created" not in tables
        [state] = await store.bucket_states([VIEW], HOUR + 10.0)
        assert (state.spent, state.reserved, state.slots) == (30, 40, {HOUR: 30})
        # 30 spent + 40 held leave exactly 30 of the 100.
        assert not (await store.reserve(reserve("r1", 31))).admitted
        assert (await store.reserve(reserve("r2", 30))).admitted
        # The reservation the old version made commits against its own record.
        assert (await store.commit("r0", 25, TokenUsage(3, 4), HOUR + 20.0)).status == "committed"
        [state] = await store.bucket_states([VIEW], HOUR + 20.0)
        assert (state.spent, state.reserved) == (55, 30)
        [row] = await store.ledger_rows(HOUR, HOUR + 3600)
        assert (row.dims, row.cost, row.requests) == (DIMS, 25, 1)
        other = BucketView("other", HOUR, HOUR, 90_000, 100)
        assert (await store.bucket_states([other], HOUR + 20.0))[0].spent == 7
    finally:
        await store.close()


async def test_processes_opening_an_old_database_at_once_rebuild_it_once(
    tmp_path: Path,
) -> None:
    path = old_database(tmp_path)
    stores = [SQLiteStore(f"sqlite:///{path}") for _ in range(3)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        for store in stores:
            [state] = await store.bucket_states([VIEW], HOUR + 10.0)
            assert (state.spent, state.reserved) == (30, 40)
        # Each process decides against the same rebuilt tables: 30 of room, taken once.
        answers = await asyncio.gather(
            *(store.reserve(reserve(f"p{n}", 30)) for n, store in enumerate(stores))
        )
        assert sorted(answer.admitted for answer in answers) == [False, False, True]
    finally:
        for store in stores:
            await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM slots").fetchone() == (2,)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
