"""The one thread that owns a SQLite connection, with group commit.

Coroutines hand it work and await the answer; the event loop never waits on disk. Write
transactions that are queued at the same moment run back to back inside one
`BEGIN IMMEDIATE … COMMIT`, each in its own SAVEPOINT so that one which fails is rolled
back alone, and all their answers are delivered, with one wake-up of the event loop, only
after the COMMIT has succeeded. Under load this turns a thread hop, a write-lock
acquisition and a WAL commit per decision into one per batch; when idle a batch is a
single job and nothing waits for company. Reads and autocommit statements run one at a
time, in submission order with the transactions around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sidecar.store.base import StoreUnavailable

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

# Bounds the time one batch holds SQLite's write lock (and the wait of its first job).
MAX_BATCH = 64


@dataclass(slots=True, eq=False)
class _Job(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    tx: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    result: T | None = None
    error: BaseException | None = None


def _unavailable(exc: BaseException) -> StoreUnavailable:
    error = StoreUnavailable(f"sqlite: {exc}")
    error.__cause__ = exc
    return error


def store_error(exc: E) -> E | StoreUnavailable:
    """What the caller sees: OperationalError (locked, I/O, disk full) is the store being
    unavailable; anything else is a bug to surface as is."""
    return _unavailable(exc) if isinstance(exc, sqlite3.OperationalError) else exc


def _settle(jobs: list[_Job[Any]]) -> None:
    for job in jobs:
        if job.future.done():  # the caller gave up (cancelled) meanwhile
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.result)


class SQLiteWorker:
    def __init__(
        self, connect: Callable[[], sqlite3.Connection], name: str = "sqlite-store"
    ) -> None:
        self._connect = connect
        self._name = name
        self._conn: sqlite3.Connection | None = None
        self._jobs: deque[_Job[Any]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False

    async def call(self, fn: Callable[[sqlite3.Connection], T], *, tx: bool) -> T:
        """Run `fn` on the connection (inside a write transaction when `tx`).

        sqlite3.OperationalError becomes StoreUnavailable; anything else `fn` raises
        reaches the caller as is, after its savepoint was rolled back.
        """
        return await self.submit(fn, tx=tx)

    def submit(self, fn: Callable[[sqlite3.Connection], T], *, tx: bool) -> asyncio.Future[T]:
        """`call`, queued before this returns: jobs run in the order they were submitted,
        so a caller can put one job ahead of another without awaiting the first."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._cond:
            if self._closed:
                raise StoreUnavailable("sqlite: the store is closed")
            self._jobs.append(_Job(fn, tx, loop, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    async def close(self) -> None:
        """Close the connection after everything already queued, then stop the thread."""
        if self._thread is not None:
            await self.call(self._shut, tx=False)
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _shut(self, conn: sqlite3.Connection) -> None:
        conn.close()
        self._conn = None

    # -- the worker thread ---------------------------------------------------------------
    def _next_batch(self) -> list[_Job[Any]] | None:
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._jobs.popleft()]
            if batch[0].tx:
                while self._jobs and self._jobs[0].tx and len(batch) < MAX_BATCH:
                    batch.append(self._jobs.popleft())
            return batch

    def _main(self) -> None:
        while (batch := self._next_batch()) is not None:
            # A caller that gave up before its job started (cancelled) is not run at all:
            # a reservation nobody waits for would only hold budget until it expires.
            live = [job for job in batch if not job.future.done()]
            if live:
                self._execute(live)
            by_loop: dict[asyncio.AbstractEventLoop, list[_Job[Any]]] = {}
            for job in live:
                by_loop.setdefault(job.loop, []).append(job)
            for loop, jobs in by_loop.items():
                # RuntimeError: that loop is closed, so nobody is waiting any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle, jobs)

    def _execute(self, batch: list[_Job[Any]]) -> None:
        try:
            if self._conn is None:
                self._conn = self._connect()
        except BaseException as exc:
            for job in batch:
                job.error = exc
            return
        conn = self._conn
        if not batch[0].tx:
            job = batch[0]
            try:
                job.result = job.fn(conn)
            except BaseException as exc:
                job.error = store_error(exc)
            return
        self._transaction(conn, batch)

    @staticmethod
    def _transaction(conn: sqlite3.Connection, batch: list[_Job[Any]]) -> None:
        single = len(batch) == 1
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                if single:
                    # Alone in its transaction: any error rolls back the whole of it below.
                    job.result = job.fn(conn)
                    continue
                conn.execute("SAVEPOINT job")
                try:
                    job.result = job.fn(conn)
                except Exception as exc:
                    if not conn.in_transaction:
                        raise  # SQLite rolled everything back itself (I/O error, disk full)
                    conn.execute("ROLLBACK TO job")
                    job.error = store_error(exc)
                conn.execute("RELEASE job")
            conn.execute("COMMIT")
        except BaseException as exc:
            # Nothing of the batch was committed, so no job may report success.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            for job in batch:
                job.result = None
                job.error = store_error(exc) if single else _unavailable(exc)
