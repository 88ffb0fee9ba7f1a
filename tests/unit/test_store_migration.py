"""Databases written by a version without error counts open, keep their data, and gain them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sidecar.budget.spool import Spool
from sidecar.model import TokenUsage
from sidecar.store.budget_types import BucketView, LedgerDims, ReserveRequest
from sidecar.store.sqlite_store import SQLiteStore

HOUR = 1_799_996_400
OLD_LEDGER = """
CREATE TABLE ledger (
  hour INTEGER NOT NULL, user TEXT NOT NULL, groups TEXT NOT NULL, token TEXT NOT NULL,
  kind TEXT NOT NULL, model TEXT NOT NULL, provider TEXT NOT NULL,
  cost INTEGER NOT NULL, requests INTEGER NOT NULL,
  input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
  PRIMARY KEY (hour, user, groups, token, kind, model, provider));
INSERT INTO ledger VALUES (1799996400, 'a@x', '["ml"]', '', 'user', 'gpt-4o', 'openai',
  500, 2, 10, 5);
"""
OLD_SPOOL = """
CREATE TABLE spool (
  request_id TEXT PRIMARY KEY, views TEXT, dims TEXT, estimate INTEGER NOT NULL,
  expires_at REAL NOT NULL, actual INTEGER, usage TEXT, created_at REAL NOT NULL);
"""


async def test_old_ledger_gains_errors_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_LEDGER)
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    try:
        [old] = await store.ledger_rows(HOUR, HOUR + 3600)
        assert (old.cost, old.requests, old.errors) == (500, 2, 0)
        view = BucketView("b", HOUR, HOUR, 90_000, 10_000)
        dims = LedgerDims("a@x", ("ml",), "", "user", "gpt-4o", "openai")
        await store.reserve(
            ReserveRequest("r1", (view,), 100, "reserve", HOUR + 1.0, HOUR + 600.0, dims)
        )
        await store.commit("r1", 0, TokenUsage(), HOUR + 2.0, error=True)
        [row] = await store.ledger_rows(HOUR, HOUR + 3600)
        assert (row.cost, row.requests, row.errors) == (500, 3, 1)
    finally:
        await store.close()


async def test_old_spool_gains_error_and_replays_an_error_as_one(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SPOOL)
    spool = Spool(str(path))
    store = SQLiteStore(f"sqlite:///{tmp_path}/store.db")
    await store.open()
    try:
        view = BucketView("b", HOUR, HOUR, 90_000, 10_000)
        dims = LedgerDims("a@x", ("ml",), "", "user", "gpt-4o", "openai")
        await spool.admitted(
            ReserveRequest("s1", (view,), 100, "reserve", HOUR + 1.0, HOUR + 600.0, dims)
        )
        await spool.completed("s1", 0, TokenUsage(), error=True)
        assert await spool.replay(store, HOUR + 5.0) == 1
        [row] = await store.ledger_rows(HOUR, HOUR + 3600)
        assert (row.cost, row.requests, row.errors) == (0, 1, 1)
        assert (await store.bucket_states([view], HOUR + 5.0))[0].spent == 0
    finally:
        await spool.close()
        await store.close()
