"""The SQLite worker's group commit: transactions queued together share one COMMIT, yet each
one that fails is rolled back alone and its caller alone sees the error."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from sidecar.store.base import StoreUnavailable
from sidecar.store.sqlite_worker import SQLiteWorker


def worker(tmp_path: Path) -> SQLiteWorker:
    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
        conn.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY)")
        return conn

    return SQLiteWorker(connect)


def insert(key: str, fail: BaseException | None = None):  # type: ignore[no-untyped-def]
    def job(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO t VALUES (?)", (key,))
        if fail is not None:
            raise fail
        return key

    return job


def keys(conn: sqlite3.Connection) -> list[str]:
    return [k for (k,) in conn.execute("SELECT k FROM t ORDER BY k")]


async def test_a_failing_job_is_rolled_back_alone(tmp_path: Path) -> None:
    w = worker(tmp_path)
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Hold the worker so that all twenty queue up and run as one batch.
    held = asyncio.ensure_future(w.call(
        lambda conn: asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(5), tx=False))
    await asyncio.sleep(0.05)
    jobs = [asyncio.ensure_future(
        w.call(insert(f"k{i:02d}", ValueError("no") if i == 7 else None), tx=True))
        for i in range(20)]
    await asyncio.sleep(0.05)
    gate.set()
    await held
    results = await asyncio.gather(*jobs, return_exceptions=True)
    assert isinstance(results[7], ValueError)
    assert [r for i, r in enumerate(results) if i != 7] == [
        f"k{i:02d}" for i in range(20) if i != 7]
    assert await w.call(keys, tx=False) == [f"k{i:02d}" for i in range(20) if i != 7]
    await w.close()


async def test_operational_errors_mean_the_store_is_unavailable(tmp_path: Path) -> None:
    w = worker(tmp_path)
    with pytest.raises(StoreUnavailable):
        await w.call(lambda conn: conn.execute("SELECT * FROM missing"), tx=True)
    with pytest.raises(StoreUnavailable):
        await w.call(lambda conn: conn.execute("SELECT * FROM missing"), tx=False)
    # A constraint violation is a bug, not an outage: it surfaces as itself.
    await w.call(insert("dup"), tx=True)
    with pytest.raises(sqlite3.IntegrityError):
        await w.call(insert("dup"), tx=True)
    await w.close()
    with pytest.raises(StoreUnavailable):
        await w.call(keys, tx=False)


async def test_a_cancelled_caller_job_does_not_run(tmp_path: Path) -> None:
    w = worker(tmp_path)
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(conn: sqlite3.Connection) -> None:
        # Holds the worker thread until the test has cancelled the job queued behind it.
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(5)

    first = asyncio.ensure_future(w.call(slow, tx=False))
    await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(w.call(insert("never"), tx=True))
    await asyncio.sleep(0.05)
    queued.cancel()
    gate.set()
    await first
    assert await w.call(keys, tx=False) == []
    await w.close()
