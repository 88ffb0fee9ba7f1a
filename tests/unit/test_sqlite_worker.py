"""The SQLite worker's group commit: transactions queued together share one COMMIT, yet each
one that fails is rolled back alone and its caller alone sees the error."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sidecar.store.base import StoreUnavailable
from sidecar.store.sqlite_worker import SQLiteWorker

T = TypeVar("T")


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


class Holder:
    """A job that occupies the worker thread until released, so the jobs submitted meanwhile
    are all queued when the worker looks for its next batch."""

    def __init__(self, w: SQLiteWorker) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = asyncio.Event()
        self._release = asyncio.Event()
        self.done = asyncio.ensure_future(w.call(self._hold, tx=False))

    def _hold(self, conn: sqlite3.Connection) -> None:
        self._loop.call_soon_threadsafe(self._running.set)
        asyncio.run_coroutine_threadsafe(self._release.wait(), self._loop).result(5)

    async def running(self) -> None:
        await asyncio.wait_for(self._running.wait(), 5)

    async def release(self) -> None:
        self._release.set()
        await self.done


async def submitted(*calls: Coroutine[Any, Any, T]) -> list[asyncio.Task[T]]:
    """Start the calls and return once each has queued its job: a task runs up to its first
    await (where `call` has queued the job) at the loop's next turn, before this one resumes."""
    futures = [asyncio.ensure_future(c) for c in calls]
    await asyncio.sleep(0)  # one turn of the loop, not a wait for time
    return futures


def insert_seeing_committed(
    key: str, path: Path, fail: BaseException | None = None
) -> Callable[[sqlite3.Connection], tuple[str, int]]:
    """Insert `key`, then count the rows another connection sees committed: inside one
    shared transaction that stays 0 until the batch's single COMMIT."""

    def job(conn: sqlite3.Connection) -> tuple[str, int]:
        conn.execute("INSERT INTO t VALUES (?)", (key,))
        if fail is not None:
            raise fail
        outside = sqlite3.connect(path)
        try:
            committed = int(outside.execute("SELECT COUNT(*) FROM t").fetchone()[0])
        finally:
            outside.close()
        return key, committed

    return job


async def test_jobs_queued_together_share_one_commit_and_a_failing_one_is_rolled_back_alone(
    tmp_path: Path,
) -> None:
    w = worker(tmp_path)
    await w.call(keys, tx=False)  # creates the table before anything is held
    holder = Holder(w)
    await holder.running()
    jobs = await submitted(
        *(
            w.call(
                insert_seeing_committed(
                    f"k{i:02d}", tmp_path / "w.db", ValueError("no") if i == 7 else None
                ),
                tx=True,
            )
            for i in range(20)
        )
    )
    await holder.release()
    results = await asyncio.gather(*jobs, return_exceptions=True)
    assert isinstance(results[7], ValueError)
    # Every other job ran before any of them was committed: one transaction, one COMMIT.
    assert [r for i, r in enumerate(results) if i != 7] == [
        (f"k{i:02d}", 0) for i in range(20) if i != 7
    ]
    assert await w.call(keys, tx=False) == [f"k{i:02d}" for i in range(20) if i != 7]
    await w.close()


async def test_jobs_queued_one_after_another_commit_one_by_one(tmp_path: Path) -> None:
    # The counterpart: with nothing queued alongside, each job commits before the next.
    w = worker(tmp_path)
    results = [
        await w.call(insert_seeing_committed(f"k{i}", tmp_path / "w.db"), tx=True) for i in range(3)
    ]
    assert results == [("k0", 0), ("k1", 1), ("k2", 2)]
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
    holder = Holder(w)
    await holder.running()
    [queued] = await submitted(w.call(insert("never"), tx=True))
    queued.cancel()
    await holder.release()
    assert await w.call(keys, tx=False) == []
    await w.close()
