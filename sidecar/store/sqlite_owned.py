"""A SQLite file owned by one process: reservations decided in memory.

`sidecar serve` in one process is the only writer of its SQLite file (an exclusive lock
beside the file keeps out a second one, and `--workers N` processes, which share the file
through SQLite's own locking instead). So the budget state can live in its memory
(`sqlite_totals.py`) and a reservation — nearly every Check's only store operation — is
decided there without a hop to the store's thread: the buckets read from dicts, the holds
added, the record appended to the journal (`sqlite_journal.py`) before the answer, and the
record written to the file with the others of the next few milliseconds in one transaction.

Everything else that changes budgets (charges, releases, expiries, backfills) still runs
as one transaction on the store's thread, after the reservations waiting to be written
(jobs run in the order they were queued), and its effect on the buckets is applied to
memory once it has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import structlog

from sidecar.store.base import StoreUnavailable
from sidecar.store.budget_types import (
    BucketState,
    BucketView,
    CommitResult,
    Reservation,
    ReserveRequest,
    ReserveResult,
)
from sidecar.store.file_lock import FileLock
from sidecar.store.sqlite_batch import insert_reservations
from sidecar.store.sqlite_journal import Journal, Record
from sidecar.store.sqlite_store import SQLiteStore, dims_json, rebuild_holds
from sidecar.store.sqlite_totals import Deltas, Open, SlotsRead, Totals

T = TypeVar("T")
log = structlog.get_logger("sidecar.store")

# Reservations wait at most this long, or until this many are waiting, before they are
# written to the file together. They are safe in the journal meanwhile; waiting longer
# makes the batches bigger and the store's thread cheaper per reservation.
_FLUSH_SECONDS = 0.02
_FLUSH_RECORDS = 256
# After a failed write to the file, the next try (the records stay in memory and journal).
_RETRY_SECONDS = 1.0
# Reservations admitted but not yet written to the file, beyond which new ones are refused
# as the store being unavailable: a file that cannot be written (disk full, I/O errors)
# must not let memory and the journal grow without end.
_MAX_UNWRITTEN = 50_000

# Buckets whose slots memory keeps (the oldest read that hold nothing are let go past it,
# and read from the file again when a decision needs them): about 50 MB.
_BUCKETS_KEPT = 100_000

# Bucket keys kept JSON-encoded for reservation records (a few callers and rules make most
# of the traffic); the cache starts again when full. About 190 bytes a key: 1,024 is some
# 0.2 MB, where 20,000 was 3.8 (a miss is one json.dumps of a short string).
_KEYS_CACHED = 1024

# A waiting reservation: its record and what it holds per bucket (by `bucket_ref`).
_Pending = tuple[Record, list[tuple[int, int]]]


class OwnedSQLiteStore(SQLiteStore):
    # Holds live in memory only: no `reserved` row is written when a reservation reaches the
    # file, is charged or expires (the file says so in `meta`; see `rebuild_holds`).
    _holds_in_file = False

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._owner_lock = FileLock(self._path, exclusive=True)
        self._journal = Journal(self._path)
        self._totals = Totals()
        self._pending: list[_Pending] = []
        # Segments holding only records that a failed write handed back.
        self._retry_segments: list[Path] = []
        # Admitted reservations not yet known to be in the file.
        self._unfiled: set[str] = set()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._key_json: dict[str, str] = {}

    # -- life --------------------------------------------------------------------------
    async def open(self) -> None:
        self._owner_lock.acquire()
        try:
            segments = self._journal.segments()
            records = [r for segment in segments for r in Journal.read(segment)]

            def start(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('holds', 'memory')")
                insert_reservations(conn, records)

            await self._tx(start)
            if records:
                log.info("reservation_journal_replayed", records=len(records))
            Journal.remove(segments)
            self._totals = await self._run(Totals.load)
        except BaseException:
            await self._worker.close()
            self._owner_lock.release()
            raise

    async def close(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        with contextlib.suppress(StoreUnavailable):
            self._flush()
            # Left current for whoever opens the file next (after the reservations above).
            await self._tx(rebuild_holds)
        await self._worker.close()
        self._journal.seal()
        self._owner_lock.release()

    # -- writing reservations to the file ----------------------------------------------
    def _flush(self) -> None:
        """Queue the waiting reservations' write to the file ahead of any job queued after
        this returns."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        sealed = self._journal.seal()
        segments, self._retry_segments = self._retry_segments, []
        if sealed is not None:
            segments.append(sealed)
        try:
            future = self._worker.submit(functools.partial(self._insert, pending=pending), tx=True)
        except StoreUnavailable:
            self._requeue(pending, segments)
            raise
        future.add_done_callback(functools.partial(self._written, pending, segments))

    @staticmethod
    def _insert(conn: sqlite3.Connection, pending: Sequence[_Pending]) -> list[_Pending]:
        """Write reservations (their holds are in memory only); returns those whose id was
        already there."""
        return [pending[i] for i in insert_reservations(conn, [p[0] for p in pending])]

    def _written(
        self, pending: list[_Pending], segments: list[Path], future: asyncio.Future[list[_Pending]]
    ) -> None:
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            log.warning("reservations_write_failed", count=len(pending), error=str(error))
            self._requeue(pending, segments)
            return
        for record, _ in pending:
            self._unfiled.discard(record[0])
        for record, record_holds in future.result():
            # The file already had this id (a minted id never repeats, so this is a store
            # used in a way it must not be): the reservation is not in the file, so memory
            # lets go of its holds too.
            log.error("reservation_id_taken", request_id=record[0])
            for key, amount in record_holds:
                self._totals.hold(key, -amount)
            self._totals.ended(record[0])
        Journal.remove(segments)

    def _requeue(self, pending: list[_Pending], segments: list[Path]) -> None:
        self._pending[:0] = pending
        self._retry_segments[:0] = segments
        if self._flush_timer is None:
            with contextlib.suppress(RuntimeError):  # no loop: closing
                loop = asyncio.get_running_loop()
                self._flush_timer = loop.call_later(_RETRY_SECONDS, self._timed_flush)

    def _timed_flush(self) -> None:
        self._flush_timer = None
        with contextlib.suppress(StoreUnavailable):
            self._flush()

    # -- budgets -----------------------------------------------------------------------
    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        ready = self.reserve_ready(request)
        if ready is not None:
            return ready
        due = self._totals.first_expiry()
        if due is not None and due <= request.now:
            # What expired counts as spend before anything is decided on these buckets.
            await self._budget_tx(lambda conn, sink: self._settle(conn, request.now, 100, sink))
        await self._read_in(request.buckets)
        if request.request_id not in self._totals.open_entries:
            return self._reserve_now(request, None)  # nearly always: a new id
        return self._reserve_now(request, await self._ready(request))

    async def _ready(self, request: ReserveRequest) -> tuple[Open, str] | None:
        """Have the buckets in memory and, for an id already open (a retry, or a caller
        repeating an id it must not), that entry and the binding it was admitted with,
        which memory does not keep. Repeated until both hold with no await after them."""
        rid = request.request_id
        stored: tuple[Open, str] | None = None
        while True:
            await self._read_in(request.buckets)
            entry = self._totals.open_entry(rid)
            if entry is None or (stored is not None and stored[0] is entry):
                return stored if entry is not None else None
            binding = await self._binding_of(rid)
            if binding is None:
                if self._totals.open_entry(rid) is entry:
                    # Admitted here yet found nowhere: retried later rather than refused.
                    raise StoreUnavailable("sqlite: the reservation is not written yet")
                continue
            stored = (entry, binding)

    async def _binding_of(self, request_id: str) -> str | None:
        """The binding of an admitted reservation: from its record while it waits to be
        written, else from the file (read after the writes queued before it). None: in
        neither (its write failed and is being retried, or its id was taken)."""
        for record, _ in self._pending:
            if record[0] == request_id:
                return record[7]
        self._flush()
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT binding FROM reservations WHERE request_id = ?", (request_id,)
            ).fetchone()
        )
        if row is not None:
            return str(row[0])
        for record, _ in self._pending:
            if record[0] == request_id:
                return record[7]
        return None

    def reserve_ready(self, request: ReserveRequest) -> ReserveResult | None:
        """`reserve`'s answer when it needs no await (nothing expired is due, every bucket
        is in memory, the id is a new one), else None: the caller then awaits `reserve`.
        A Check answered here makes no task and waits for no turn of the event loop."""
        totals = self._totals
        due = totals.first_expiry()
        if (
            (due is not None and due <= request.now)
            or request.request_id in totals.open_entries
            or totals.missing(request.buckets)
        ):
            return None
        return self._reserve_now(request, None)

    async def _read_in(self, buckets: Sequence[BucketView]) -> None:
        """Have every bucket's slots in memory. The read's result is applied by a callback
        on its future: futures complete in the order their jobs ran, so a change
        committed before the read is in it, and one committed after is applied after it.
        Repeated while a key is missing: eviction may run between that callback and this
        coroutine going on."""
        while missing := self._totals.missing(buckets):
            read = self._worker.submit(functools.partial(Totals.read_slots, keys=missing), tx=False)
            read.add_done_callback(self._read_done)
            await read

    def _read_done(self, future: asyncio.Future[SlotsRead]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._totals.loaded(future.result())

    def _reserve_now(
        self, request: ReserveRequest, stored: tuple[Open, str] | None
    ) -> ReserveResult:
        """The whole decision, with no await in it: nothing else changes memory meanwhile.
        Written as plain loops: this is nearly all of a Check's store work."""
        totals = self._totals
        buckets = request.buckets
        spent, held = totals.read(buckets)
        seen = totals.existing(request.request_id, request.binding, request.now, stored)
        if seen is not None:
            # Only a retry of the very same admission may pass on an existing id.
            states = tuple(map(BucketState, spent, held))
            return ReserveResult(seen, (), states, duplicate=seen, conflict=not seen)
        tin, tout = request.tokens
        by_measure = {
            "usd": request.amount,
            "tokens": tin + tout,
            "input_tokens": tin,
            "output_tokens": tout,
            "requests": 1,
        }
        amounts = [by_measure[b.measure] for b in buckets]
        reserve_mode = request.mode == "reserve"
        # admission/fit.py's `fits`, inlined (test_fit_agreement holds every store to it).
        failed = tuple(
            i
            for i, b in enumerate(buckets)
            if b.enforce
            and (spent[i] + held[i] + amounts[i] > b.limit if reserve_mode else spent[i] >= b.limit)
        )
        if failed:
            return ReserveResult(False, failed, tuple(map(BucketState, spent, held)))
        if len(self._unfiled) >= _MAX_UNWRITTEN:
            raise StoreUnavailable(
                f"sqlite: {len(self._unfiled)} reservations are not written to the file yet"
            )
        rid, binding = request.request_id, request.binding
        if "\t" in rid or "\n" in rid or "\t" in binding or "\n" in binding:
            raise ValueError("a reservation id or binding holds a tab or a newline")
        holds = amounts if reserve_mode else [0] * len(amounts)
        key_json = self._key_json
        parts = []
        for b, amount, hold in zip(buckets, amounts, holds, strict=True):
            key = b.key
            encoded = key_json.get(key)
            if encoded is None:
                if len(key_json) >= _KEYS_CACHED:
                    key_json.clear()
                encoded = key_json[key] = json.dumps(key)
            parts.append(
                f'[{encoded},{b.slot},{b.slot + b.ttl_seconds},"{b.measure}",{amount},{hold}]'
            )
        record: Record = (
            rid,
            request.amount,
            request.amount if reserve_mode else 0,
            request.expires_at,
            request.now,
            "[" + ",".join(parts) + "]",
            dims_json(request.dims),
            binding,
            tin,
            tout,
        )
        try:
            self._journal.append(record)
        except OSError as exc:
            raise StoreUnavailable(f"sqlite journal: {exc}") from exc
        record_holds = []
        held_of = totals.buckets
        for b, hold in zip(buckets, holds, strict=True):
            if hold:
                ref = b.ref
                was = held_of.get(ref)
                if was is None:
                    totals.hold(ref, hold)  # not in memory (read in above, so not expected)
                else:
                    # The first hold shares the request's int: one for all its µUSD buckets.
                    held_of[ref] = was + hold if was else hold
                record_holds.append((ref, hold))
        totals.opened(rid, request.expires_at)
        self._unfiled.add(rid)
        self._pending.append((record, record_holds))
        if len(self._pending) >= _FLUSH_RECORDS:
            self._flush()
        elif self._flush_timer is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(_FLUSH_SECONDS, self._timed_flush)
        return ReserveResult(
            True,
            (),
            tuple(BucketState(s, h + d) for s, h, d in zip(spent, held, holds, strict=True)),
        )

    async def _budget_tx(self, fn: Callable[[sqlite3.Connection, Deltas | None], T]) -> T:
        self._flush()

        def job(conn: sqlite3.Connection) -> tuple[T, Deltas]:
            sink = Deltas()
            return fn(conn, sink), sink

        done = self._worker.submit(job, tx=True)
        # Applied by a callback, in the order the jobs ran (see `_read_in`).
        done.add_done_callback(self._budget_done)
        result, _ = await done
        return result

    def _budget_done(self, future: asyncio.Future[tuple[Any, Deltas]]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._totals.apply(future.result()[1])

    def _found(self, request_id: str, result: CommitResult) -> CommitResult:
        # Not found in the file although admitted here: its write failed and is being
        # retried, so this charge must be retried too rather than dropped.
        if result.status == "unknown" and request_id in self._unfiled:
            raise StoreUnavailable("sqlite: the reservation is not written to the file yet")
        return result

    async def settle_expired(self, now: float, limit: int = 500) -> int:
        count = await super().settle_expired(now, limit)
        # As the file's housekeeping in the same pass; then memory kept to its bound.
        self._totals.prune(now)
        self._totals.evict(_BUCKETS_KEPT)
        return count

    async def open_reservations(self) -> int:
        return self._totals.open_count()

    # -- reads that must see the reservations still on their way -----------------------
    async def reservation(self, request_id: str) -> Reservation | None:
        self._flush()
        return await super().reservation(request_id)

    async def bucket_states(self, buckets: list[BucketView], now: float) -> list[BucketState]:
        await self._read_in(buckets)
        return [self._totals.state(b, with_slots=True) for b in buckets]

    async def scrub(self) -> None:
        self._flush()
        await super().scrub()
