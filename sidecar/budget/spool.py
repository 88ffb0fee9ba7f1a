"""The fail-open spool: charges made while the budget store was unreachable, kept in a local
SQLite file and replayed exactly once when the store is back.

Replay is exactly-once because both store operations are idempotent by request id: a
replayed reservation that already exists is a duplicate, a replayed commit that already
happened is a duplicate. An entry leaves the spool only after its commit was acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from sidecar.model import TokenUsage
from sidecar.store.base import BudgetStore, StoreUnavailable
from sidecar.store.budget_types import (
    BucketView,
    LedgerDims,
    ReserveRequest,
    dims_from_json,
    dims_to_json,
)
from sidecar.store.private_file import make_private

log = structlog.get_logger("sidecar.spool")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
  request_id TEXT PRIMARY KEY, views TEXT, dims TEXT, estimate INTEGER NOT NULL,
  expires_at REAL NOT NULL, actual INTEGER, usage TEXT, created_at REAL NOT NULL,
  error INTEGER NOT NULL DEFAULT 0);
"""


def _migrate(conn: sqlite3.Connection) -> None:
    """A spool written by an older version (it may hold charges still to replay)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(spool)")}
    if "error" not in columns:
        conn.execute("ALTER TABLE spool ADD COLUMN error INTEGER NOT NULL DEFAULT 0")


class Spool:
    def __init__(self, path: str) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            make_private(self._path)
            conn = sqlite3.connect(self._path, isolation_level=None, timeout=10.0)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a spooled charge is money; it must survive a power cut, not only a crash.
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            _migrate(conn)
            self._conn = conn
        return self._conn

    async def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        def call() -> list[Any]:
            return list(self._db().execute(sql, args).fetchall())

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def admitted(self, request: ReserveRequest) -> None:
        """A request admitted without a reservation: charge it later (estimate by default)."""
        # An object since buckets have measures; a list (µUSD buckets only) before.
        views = json.dumps(
            {
                "views": [
                    [v.key, v.slot, v.since, v.ttl_seconds, v.limit, v.measure]
                    for v in request.buckets
                ],
                "tokens": list(request.tokens),
            }
        )
        await self._run(
            "INSERT OR IGNORE INTO spool VALUES (?, ?, ?, ?, ?, NULL, NULL, ?, 0)",
            (
                request.request_id,
                views,
                dims_to_json(request.dims),
                request.amount,
                request.expires_at,
                time.time(),
            ),
        )

    async def completed(
        self,
        request_id: str,
        actual: int,
        usage: TokenUsage,
        error: bool = False,
        tokens: tuple[int, int] | None = None,
    ) -> None:
        """The actual cost of a request, whether or not its reservation reached the store;
        `error`: the provider answered with an error (replayed as one); `tokens` are what
        token budgets are charged when not the usage's own counts."""
        fields = [
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.cache_write_tokens,
        ]
        usage_json = json.dumps(fields if tokens is None else [*fields, *tokens])
        await self._run(
            "INSERT INTO spool VALUES (?, NULL, NULL, 0, 0, ?, ?, ?, ?) "
            "ON CONFLICT(request_id) DO UPDATE SET actual = excluded.actual, "
            "usage = excluded.usage, error = excluded.error",
            (request_id, actual, usage_json, time.time(), 1 if error else 0),
        )

    async def has(self, request_id: str) -> bool:
        rows = await self._run("SELECT 1 FROM spool WHERE request_id=?", (request_id,))
        return bool(rows)

    async def size(self) -> int:
        return int((await self._run("SELECT COUNT(*) FROM spool"))[0][0])

    async def replay(self, store: BudgetStore, now: float, limit: int = 200) -> int:
        """Push what is due to the store; stop at the first failure. Returns entries done."""
        rows = await self._run(
            "SELECT request_id, views, dims, estimate, expires_at, actual, usage, error "
            "FROM spool "
            "WHERE actual IS NOT NULL OR expires_at <= ? ORDER BY created_at LIMIT ?",
            (now, limit),
        )
        done = 0
        for request_id, views, dims, estimate, _expires, actual, usage_json, error in rows:
            fields = json.loads(usage_json) if usage_json else []
            usage = TokenUsage(*fields[:4])
            budget_tokens: tuple[int, int] | None = (
                (fields[4], fields[5]) if len(fields) == 6 else None
            )
            try:
                if views is not None:
                    admitted = _admitted(views)
                    dims_value: LedgerDims = dims_from_json(dims)
                    await store.reserve(
                        ReserveRequest(
                            request_id,
                            admitted[0],
                            estimate,
                            "reserve",
                            now,
                            now + 3600,
                            dims_value,
                            tokens=admitted[1],
                        )
                    )
                    if actual is None:
                        # Never completed: token budgets pay the estimate, like µUSD ones.
                        budget_tokens = admitted[1]
                cost = actual if actual is not None else estimate
                await store.commit(
                    request_id,
                    cost,
                    usage,
                    now,
                    error=bool(error) and actual is not None,
                    tokens=budget_tokens,
                )
            except StoreUnavailable:
                break
            await self._run("DELETE FROM spool WHERE request_id=?", (request_id,))
            done += 1
        if done:
            log.info("spool_replayed", entries=done)
        return done

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)


def _admitted(views: str) -> tuple[tuple[BucketView, ...], tuple[int, int]]:
    """The buckets and token estimate of a spooled admission."""
    data = json.loads(views)
    if isinstance(data, list):  # spooled before buckets had measures: µUSD only
        data = {"views": [[*v, "usd"] for v in data], "tokens": [0, 0]}
    buckets = tuple(
        # Replayed spend is counted, never refused: the request already ran.
        BucketView(k, slot, since, ttl, lim, enforce=False, measure=measure)
        for k, slot, since, ttl, lim, measure in data["views"]
    )
    tokens_in, tokens_out = data["tokens"]
    return buckets, (int(tokens_in), int(tokens_out))
