"""The embedded store: one SQLite file, safe with several worker processes.

Every operation runs on one dedicated thread per process (sqlite3 connections are not
shareable across threads, and the event loop must never wait on disk). Budget operations run
inside `BEGIN IMMEDIATE`, which takes SQLite's write lock up front, so reservations from
several processes serialize instead of racing; transactions queued at the same moment share
one of them (group commit, `sidecar/store/sqlite_worker.py`).
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sidecar.admission.fit import fits
from sidecar.model import TokenUsage
from sidecar.store.base import Doc, StoreUnavailable
from sidecar.store.budget_types import (
    BucketState,
    BucketView,
    CommitResult,
    LedgerDims,
    LedgerPart,
    LedgerRow,
    Pricer,
    Reservation,
    ReserveRequest,
    ReserveResult,
    dims_from_json,
    dims_to_json,
    measured,
)
from sidecar.store.file_lock import FileLock
from sidecar.store.private_file import make_private
from sidecar.store.sqlite_batch import (
    INSERT_RESERVATION,
    LEDGER_COLUMNS,
    LedgerAdd,
    charge_records,
    insert_reservations,
    mark_committed,
    write_ledger,
)
from sidecar.store.sqlite_journal import Journal, Record
from sidecar.store.sqlite_records import entries as _entries
from sidecar.store.sqlite_records import holds_of
from sidecar.store.sqlite_totals import Deltas
from sidecar.store.sqlite_worker import MAX_BATCH, SQLiteWorker

T = TypeVar("T")

# Committed and expired reservations are kept this long so late or duplicate completions
# are recognised instead of charged twice.
_DONE_RETENTION_SECONDS = 7 * 24 * 3600

# Rows per multi-row statement: at most 4 parameters a row stays under 999, the smallest
# limit of bound parameters per statement any SQLite version has had.
_BUCKETS_PER_STATEMENT = 200
# Charges per job of `charge_many`: as long as the worker's longest batch of single jobs.
_CHARGES_PER_JOB = MAX_BATCH
_ADD_RESERVED = (
    "INSERT INTO reserved VALUES (?, ?) ON CONFLICT(bucket) DO UPDATE SET "
    "amount = amount + excluded.amount"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
  collection TEXT NOT NULL, key TEXT NOT NULL, doc TEXT NOT NULL, expires_at REAL,
  PRIMARY KEY (collection, key));
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL,
  expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS slots (bucket TEXT NOT NULL, slot INTEGER NOT NULL,
  amount INTEGER NOT NULL, expires_at INTEGER NOT NULL, PRIMARY KEY (bucket, slot))
  WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reserved (bucket TEXT PRIMARY KEY, amount INTEGER NOT NULL)
  WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
  request_id TEXT PRIMARY KEY, state TEXT NOT NULL, estimate INTEGER NOT NULL,
  held INTEGER NOT NULL, expires_at REAL NOT NULL, created_at REAL NOT NULL,
  buckets TEXT NOT NULL, dims TEXT NOT NULL, binding TEXT NOT NULL DEFAULT '',
  input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS reservations_open ON reservations (state, expires_at);
-- Housekeeping deletes done reservations and dead slots by age every second, holding the
-- write lock: a full scan of a million rows took 110 ms, during which no decision could be
-- made; with these indexes (reservations_open for done reservations) it is a range delete.
CREATE INDEX IF NOT EXISTS slots_expiry ON slots (expires_at);
CREATE TABLE IF NOT EXISTS ledger (
  hour INTEGER NOT NULL, user TEXT NOT NULL, groups TEXT NOT NULL, token TEXT NOT NULL,
  kind TEXT NOT NULL, model TEXT NOT NULL, provider TEXT NOT NULL,
  cost INTEGER NOT NULL, requests INTEGER NOT NULL,
  input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
  errors INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (hour, user, groups, token, kind, model, provider));
-- ('holds', 'memory'): a process owning the file keeps the holds in its memory and the
-- `reserved` table is not current; whoever opens the file next without an owner running
-- rebuilds it from the open reservations (`rebuild_holds`).
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


# Columns added after a table was first created, as (table, column, definition).
_ADDED_COLUMNS = (
    ("reservations", "binding", "TEXT NOT NULL DEFAULT ''"),
    ("ledger", "errors", "INTEGER NOT NULL DEFAULT 0"),
    ("reservations", "input_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("reservations", "output_tokens", "INTEGER NOT NULL DEFAULT 0"),
)


# Indexes earlier versions created and no query uses any more (each costs a page write per
# reservation); IF EXISTS makes dropping them a no-op once done, whoever did it.
_DROPPED_INDEXES = ("reservations_created",)


# Tables earlier versions created with a rowid and that are now WITHOUT ROWID, as (table,
# its columns, the indexes it has beside its primary key). A bucket's slots and its hold are
# read by primary key on every decision: stored in the primary key's own B-tree, a slot
# range is one scan instead of a look-up per slot, and a write changes one B-tree, not two.
_WITHOUT_ROWID = (
    ("slots", "bucket, slot, amount, expires_at", ("slots_expiry",)),
    ("reserved", "bucket, amount", ()),
)


def _table_sql(name: str) -> str:
    """The CREATE TABLE statement of `name` in `_SCHEMA`."""
    start = _SCHEMA.index(f"CREATE TABLE IF NOT EXISTS {name} (")
    return _SCHEMA[start : _SCHEMA.index(";", start) + 1]


def _index_sql(name: str) -> str:
    start = _SCHEMA.index(f"CREATE INDEX IF NOT EXISTS {name} ")
    return _SCHEMA[start : _SCHEMA.index(";", start) + 1]


def _has_rowid(conn: sqlite3.Connection, table: str) -> bool:
    row = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    return row is not None and "WITHOUT ROWID" not in row[0].upper()


def _drop_rowids(conn: sqlite3.Connection) -> None:
    """Rebuild the tables of `_WITHOUT_ROWID` an earlier version created with a rowid, rows
    and all, each in one transaction: several processes opening the file at once wait for
    the write lock, and only the first finds anything to do."""
    for table, columns, indexes in _WITHOUT_ROWID:
        if not _has_rowid(conn, table):
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            if _has_rowid(conn, table):
                conn.execute(_table_sql(table).replace(f" {table} (", f" {table}_rebuilt (", 1))
                conn.execute(
                    f"INSERT INTO {table}_rebuilt ({columns}) SELECT {columns} FROM {table}"
                )
                conn.execute(f"DROP TABLE {table}")
                conn.execute(f"ALTER TABLE {table}_rebuilt RENAME TO {table}")
                for index in indexes:
                    conn.execute(_index_sql(index))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _migrate(conn: sqlite3.Connection) -> None:
    """Columns added after a database was first created (CREATE TABLE IF NOT EXISTS keeps the
    old shape of an existing table), indexes dropped and tables rebuilt since."""
    for index in _DROPPED_INDEXES:
        conn.execute(f"DROP INDEX IF EXISTS {index}")
    _drop_rowids(conn)
    for table, column, definition in _ADDED_COLUMNS:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column in columns:
            continue
        try:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except sqlite3.OperationalError as exc:
            # Another worker process added it between our look and our change.
            if "duplicate column" not in str(exc):
                raise


def _charge_row(conn: sqlite3.Connection, request_id: str) -> tuple[tuple[Any, ...] | None, bool]:
    """The reservation record as a commit reads it: state, estimate, held, buckets, dims,
    created_at, input_tokens, output_tokens (None when there is none); and whether it was
    open and is now marked committed.

    An open record (nearly every commit) is marked and read in one statement; the caller
    commits it, or reopens it (`_reopen`) when it turns out to charge nothing.
    """
    rows = conn.execute(
        "UPDATE reservations SET state = 'committed' WHERE request_id = ? AND state = 'open' "
        "RETURNING 'open', estimate, held, buckets, dims, created_at, input_tokens, "
        "output_tokens",
        (request_id,),
    ).fetchall()
    if rows:
        return rows[0], True
    row: tuple[Any, ...] | None = conn.execute(
        "SELECT state, estimate, held, buckets, dims, created_at, input_tokens, "
        "output_tokens FROM reservations WHERE request_id=?",
        (request_id,),
    ).fetchone()
    return row, False


def _reopen(conn: sqlite3.Connection, request_id: str) -> None:
    """Undo `_charge_row`'s mark: the record is open again, as if never read."""
    conn.execute("UPDATE reservations SET state = 'open' WHERE request_id = ?", (request_id,))


# The ledger dimensions of recent reservations, decoded or encoded once rather than on
# every reservation and charge: a few callers and models make most of the traffic.
_DIMS_CACHED = 4096


@functools.lru_cache(maxsize=_DIMS_CACHED)
def dims_json(dims: LedgerDims) -> str:
    return dims_to_json(dims)


@functools.lru_cache(maxsize=_DIMS_CACHED)
def _dims(text: str) -> LedgerDims:
    return dims_from_json(text)


@functools.lru_cache(maxsize=_DIMS_CACHED)
def _ledger_dims(text: str) -> tuple[str, str, str, str, str, str]:
    """A reservation's dimensions as the ledger's key columns (groups as JSON text)."""
    dims = _dims(text)
    groups = json.dumps(list(dims.groups))
    return dims.user, groups, dims.token, dims.kind, dims.model, dims.provider


@functools.cache
def _states_sql(buckets: int) -> str:
    """`SQLiteStore._states`'s statement for `buckets` buckets: one text per count, so
    sqlite3's statement cache keeps it prepared."""
    per_bucket = (
        "(SELECT COALESCE(SUM(amount), 0) FROM slots WHERE bucket = ? AND slot >= ?), "
        "COALESCE((SELECT amount FROM reserved WHERE bucket = ?), 0)"
    )
    # The (state, expires_at) index answers MIN with one seek.
    return "SELECT (SELECT MIN(expires_at) FROM reservations WHERE state = 'open'), " + ", ".join(
        (per_bucket,) * buckets
    )


# How long a connection waits for another process's lock before giving up.
_BUSY_SECONDS = 10.0


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL. The switch needs the file to itself, and SQLite answers
    "database is locked" at once, without waiting through the busy handler, while another
    process is switching it or rebuilding a table (`sidecar serve --workers N` opening a
    database together): so it is retried until the busy timeout."""
    deadline = time.monotonic() + _BUSY_SECONDS
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def recover(conn: sqlite3.Connection, records: Sequence[Record]) -> None:
    """Journaled reservations written to the file (an id already there is left as it is),
    and the holds rebuilt when they were kept elsewhere or reservations were added."""
    added = len(records) - len(insert_reservations(conn, records))
    rebuild_holds(conn, force=added > 0)


def rebuild_holds(conn: sqlite3.Connection, force: bool = False) -> None:
    """Make `reserved` current again after a process kept the holds in its memory: the sum,
    per bucket, of what the open reservations hold (which is what the table holds whenever
    it is kept). Nothing to do when none did, unless `force`."""
    if not force and conn.execute("SELECT 1 FROM meta WHERE key = 'holds'").fetchone() is None:
        return
    totals: dict[str, int] = {}
    for buckets_json, estimate, held in conn.execute(
        "SELECT buckets, estimate, held FROM reservations WHERE state = 'open'"
    ):
        for key, hold in holds_of(buckets_json, estimate, held):
            totals[key] = totals.get(key, 0) + hold
    conn.execute("DELETE FROM reserved")
    conn.executemany("INSERT INTO reserved VALUES (?, ?)", totals.items())
    conn.execute("DELETE FROM meta WHERE key = 'holds'")


def _path_from_url(url: str) -> str:
    path = url.removeprefix("sqlite:///")
    if not path:
        raise ValueError("sqlite URL needs a path: sqlite:///./sidecar.db")
    return path


class SQLiteStore:
    """`shared`: opened by one of several serving processes (`sidecar serve --workers N`),
    which keeps out a process that would own the file alone (`sqlite_owned.py`)."""

    # Whether the `reserved` table is kept current (not by a process owning the file).
    _holds_in_file = True

    def __init__(self, url: str, *, shared: bool = False) -> None:
        self._path = _path_from_url(url)
        self._worker = SQLiteWorker(self._connect)
        self._lock = FileLock(self._path, exclusive=False) if shared else None

    # -- plumbing ----------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        make_private(self._path)
        conn = sqlite3.connect(self._path, isolation_level=None, timeout=_BUSY_SECONDS)
        _use_wal(conn)
        # NORMAL in WAL mode is durable against process crashes, which is what we promise.
        conn.execute("PRAGMA synchronous=NORMAL")
        # Deleted rows' bytes are zeroed on the pages being written anyway (no extra I/O).
        conn.execute("PRAGMA secure_delete=FAST")
        conn.executescript(_SCHEMA)
        _migrate(conn)
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._worker.call(fn, tx=False)

    async def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # BEGIN IMMEDIATE … COMMIT, shared with the transactions queued alongside.
        return await self._worker.call(fn, tx=True)

    async def open(self) -> None:
        if self._lock is not None:
            self._lock.acquire()
            await self._recover()
            return
        # Claiming nothing (a tool, a test): recovery only while no process owns the file
        # (one that does keeps its holds in memory and its newest reservations in its
        # journal, and is the one to recover them).
        probe = FileLock(self._path, exclusive=False)
        try:
            probe.acquire()
        except StoreUnavailable:
            await self._run(lambda conn: None)
            return
        try:
            await self._recover()
        finally:
            probe.release()

    async def _recover(self) -> None:
        """What a process that owned the file left behind when it was killed: the
        reservations of its journal written to the file, and `reserved` made current."""
        segments = Journal(self._path).segments()
        records = [r for segment in segments for r in Journal.read(segment)]
        await self._tx(functools.partial(recover, records=records))
        Journal.remove(segments)

    async def close(self) -> None:
        await self._worker.close()
        if self._lock is not None:
            self._lock.release()

    async def scrub(self) -> None:
        # VACUUM rewrites the file from live rows only; the WAL still holds old page images
        # until it is checkpointed and truncated.
        def scrub(conn: sqlite3.Connection) -> None:
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        await self._run(scrub)

    async def ping(self) -> bool:
        try:
            await self._run(lambda conn: conn.execute("SELECT 1").fetchone())
        except StoreUnavailable:
            return False
        return True

    # -- documents ---------------------------------------------------------------------
    async def get_doc(self, collection: str, key: str, *, now: float) -> Doc | None:
        def get(conn: sqlite3.Connection) -> Doc | None:
            row = conn.execute(
                "SELECT doc FROM docs WHERE collection=? AND key=? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (collection, key, now),
            ).fetchone()
            return None if row is None else dict(json.loads(row[0]))

        return await self._run(get)

    async def put_doc(
        self,
        collection: str,
        key: str,
        doc: Doc,
        ttl_seconds: int | None = None,
        *,
        now: float,
    ) -> None:
        expires = None if ttl_seconds is None else now + ttl_seconds
        await self._run(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO docs VALUES (?, ?, ?, ?)",
                (collection, key, json.dumps(doc, sort_keys=True), expires),
            )
        )

    async def delete_doc(self, collection: str, key: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM docs WHERE collection=? AND key=?", (collection, key))
            return cur.rowcount > 0

        return await self._run(delete)

    async def list_docs(self, collection: str, *, now: float) -> list[Doc]:
        def scan(conn: sqlite3.Connection) -> list[Doc]:
            rows = conn.execute(
                "SELECT doc FROM docs WHERE collection=? "
                "AND (expires_at IS NULL OR expires_at > ?) ORDER BY key",
                (collection, now),
            ).fetchall()
            return [dict(json.loads(r[0])) for r in rows]

        return await self._run(scan)

    async def swap_doc(
        self,
        collection: str,
        key: str,
        expected: Doc | None,
        new: Doc | None,
        ttl_seconds: int | None = None,
        *,
        now: float,
    ) -> bool:
        def swap(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT doc FROM docs WHERE collection=? AND key=? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (collection, key, now),
            ).fetchone()
            current = None if row is None else json.loads(row[0])
            if current != expected:
                return False
            if new is None:
                conn.execute("DELETE FROM docs WHERE collection=? AND key=?", (collection, key))
            else:
                expires = None if ttl_seconds is None else now + ttl_seconds
                conn.execute(
                    "INSERT OR REPLACE INTO docs VALUES (?, ?, ?, ?)",
                    (collection, key, json.dumps(new, sort_keys=True), expires),
                )
            return True

        return await self._tx(swap)

    async def incr(self, key: str, amount: int, ttl_seconds: int, *, now: float) -> int:
        def bump(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM counters WHERE key=? AND expires_at <= ?", (key, now))
            conn.execute(
                "INSERT INTO counters VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                (key, amount, now + ttl_seconds),
            )
            row = conn.execute("SELECT value FROM counters WHERE key=?", (key,)).fetchone()
            return int(row[0])

        return await self._tx(bump)

    # -- budgets -----------------------------------------------------------------------
    @staticmethod
    def _state(conn: sqlite3.Connection, bucket: BucketView, with_slots: bool) -> BucketState:
        if with_slots:
            rows = conn.execute(
                "SELECT slot, amount FROM slots WHERE bucket=? AND slot>=?",
                (bucket.key, bucket.since),
            ).fetchall()
            slots = {int(s): int(a) for s, a in rows}
            spent = sum(slots.values())
        else:
            slots = {}
            spent = int(
                conn.execute(
                    "SELECT COALESCE(SUM(amount), 0) FROM slots WHERE bucket=? AND slot>=?",
                    (bucket.key, bucket.since),
                ).fetchone()[0]
            )
        row = conn.execute("SELECT amount FROM reserved WHERE bucket=?", (bucket.key,)).fetchone()
        return BucketState(spent=spent, reserved=int(row[0]) if row else 0, slots=slots)

    @staticmethod
    def _states(
        conn: sqlite3.Connection, buckets: Sequence[BucketView]
    ) -> tuple[list[BucketState], float | None]:
        """Spent and reserved of many buckets, and when the earliest open reservation
        expires (None: none is open), in one statement returning one row: a decision reads
        a dozen buckets, and each statement, and each row stepped, costs more in Python
        (and in handing the GIL back and forth) than in SQLite."""
        states: list[BucketState] = []
        due: float | None = None
        for start in range(0, len(buckets), _BUCKETS_PER_STATEMENT):
            chunk = buckets[start : start + _BUCKETS_PER_STATEMENT]
            params: list[object] = []
            for b in chunk:
                params += (b.key, b.since, b.key)
            row = conn.execute(_states_sql(len(chunk)), params).fetchone()
            due = row[0]
            states += [BucketState(row[i], row[i + 1]) for i in range(1, len(row), 2)]
        return states, due

    @staticmethod
    def _add_slot(
        conn: sqlite3.Connection,
        key: str,
        slot: int,
        amount: int,
        expires: int,
        sink: Deltas | None = None,
    ) -> None:
        if sink is not None:
            sink.spent.append((key, slot, amount, expires))
        conn.execute(
            "INSERT INTO slots VALUES (?, ?, ?, ?) ON CONFLICT(bucket, slot) DO UPDATE SET "
            "amount = amount + excluded.amount, "
            "expires_at = MAX(expires_at, excluded.expires_at)",
            (key, slot, amount, expires),
        )

    @staticmethod
    def _add_slots_many(
        conn: sqlite3.Connection,
        rows: Sequence[tuple[str, int, int, int]],
        sink: Deltas | None = None,
    ) -> None:
        """`_add_slot` for many (key, slot, amount, expires) rows in one statement each
        chunk: a commit touches every bucket of its request."""
        if sink is not None:
            sink.spent += rows
        for start in range(0, len(rows), _BUCKETS_PER_STATEMENT):
            chunk = rows[start : start + _BUCKETS_PER_STATEMENT]
            params: list[object] = []
            for row in chunk:
                params += row
            conn.execute(
                "INSERT INTO slots VALUES "
                + ",".join(("(?,?,?,?)",) * len(chunk))
                + " ON CONFLICT(bucket, slot) DO UPDATE SET "
                "amount = amount + excluded.amount, "
                "expires_at = MAX(expires_at, excluded.expires_at)",
                params,
            )

    def _add_reserved(
        self, conn: sqlite3.Connection, key: str, amount: int, sink: Deltas | None = None
    ) -> None:
        if sink is not None:
            sink.held.append((key, amount))
        if self._holds_in_file:
            conn.execute(_ADD_RESERVED, (key, amount))

    def _add_reserved_many(
        self,
        conn: sqlite3.Connection,
        holds: Sequence[tuple[str, int]],
        sink: Deltas | None = None,
    ) -> None:
        # One multi-row statement, not executemany: a third of the time for a dozen rows.
        holds = [(key, amount) for key, amount in holds if amount]
        if sink is not None:
            sink.held += holds
        if not self._holds_in_file:
            return
        for start in range(0, len(holds), _BUCKETS_PER_STATEMENT):
            chunk = holds[start : start + _BUCKETS_PER_STATEMENT]
            params: list[object] = []
            for key, amount in chunk:
                params += (key, amount)
            conn.execute(
                "INSERT INTO reserved VALUES "
                + ",".join(("(?,?)",) * len(chunk))
                + " ON CONFLICT(bucket) DO UPDATE SET amount = amount + excluded.amount",
                params,
            )

    @staticmethod
    def _add_ledger(
        conn: sqlite3.Connection,
        hour: int,
        dims_json: str,
        cost: int,
        requests: int,
        usage: TokenUsage,
        errors: int = 0,
        into: list[LedgerAdd] | None = None,
    ) -> None:
        """Add to the ledger's row of `hour` and the dimensions; with `into`, only noted
        there, for the caller to write (`_write_ledger`, once per row for a whole batch)."""
        row: LedgerAdd = (
            (hour, *_ledger_dims(dims_json)),
            [cost, requests, usage.total_input, usage.output_tokens, errors],
        )
        if into is not None:
            into.append(row)
        else:
            write_ledger(conn, [row])

    def _settle(
        self, conn: sqlite3.Connection, now: float, limit: int, sink: Deltas | None = None
    ) -> int:
        rows = conn.execute(
            "SELECT request_id, estimate, held, buckets, dims, created_at FROM reservations "
            "WHERE state='open' AND expires_at <= ? ORDER BY expires_at LIMIT ?",
            (now, limit),
        ).fetchall()
        for request_id, estimate, held, buckets_json, dims_json, created in rows:
            # Never completed: the request may well have cost money, so it pays its estimate.
            for key, slot, expires, _, amount, hold in _entries(buckets_json, estimate, held):
                if hold:
                    self._add_reserved(conn, key, -hold, sink)
                self._add_slot(conn, key, slot, amount, expires, sink)
            self._add_ledger(
                conn, int(created) // 3600 * 3600, dims_json, estimate, 1, TokenUsage()
            )
            conn.execute(
                "UPDATE reservations SET state='expired' WHERE request_id=?", (request_id,)
            )
            if sink is not None:
                sink.ended.append(request_id)
        return len(rows)

    def _housekeep(self, conn: sqlite3.Connection, now: float) -> None:
        conn.execute("DELETE FROM slots WHERE expires_at < ?", (int(now),))
        # Holds released to 0 stay until here rather than being deleted by each commit: a
        # statement less per commit, and a busy bucket's row is updated in place instead
        # of deleted and inserted again. The table holds only buckets held within the last
        # pass, so the scan is short.
        conn.execute("DELETE FROM reserved WHERE amount = 0")
        # Retention counts from expiry (never before creation), so the (state, expires_at)
        # index serves this range delete and no other index is kept up to date per request.
        conn.execute(
            "DELETE FROM reservations WHERE state IN ('committed', 'expired') AND expires_at < ?",
            (now - _DONE_RETENTION_SECONDS,),
        )
        conn.execute("DELETE FROM docs WHERE expires_at IS NOT NULL AND expires_at < ?", (now,))
        conn.execute("DELETE FROM counters WHERE expires_at < ?", (now,))

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        def existing(conn: sqlite3.Connection, states: list[BucketState]) -> ReserveResult | None:
            row = conn.execute(
                "SELECT state, expires_at, binding FROM reservations WHERE request_id=?",
                (request.request_id,),
            ).fetchone()
            if row is None:
                return None
            state, expires_at, binding = row
            # Only a retry of the very same admission may pass on an existing id; an id
            # replayed for another request, or after its reservation ended, is no pass.
            same = state == "open" and expires_at > request.now and binding == request.binding
            return ReserveResult(same, (), tuple(states), duplicate=same, conflict=not same)

        def reserve(conn: sqlite3.Connection) -> ReserveResult:
            states, due = self._states(conn, request.buckets)
            # Expired reservations are settled first (they may count as spend now), but
            # only when one is: the earliest expiry comes with the states, read under the
            # write lock, so it also sees what other processes reserved.
            if due is not None and due <= request.now:
                self._settle(conn, request.now, 100)
                states, _ = self._states(conn, request.buckets)
            amounts = [request.amount_for(b) for b in request.buckets]
            reserve_mode = request.mode == "reserve"
            failed = tuple(
                i
                for i, (b, s, amount) in enumerate(
                    zip(request.buckets, states, amounts, strict=True)
                )
                if b.enforce and not fits(s, amount, b.limit, request.mode)
            )
            if failed:
                return existing(conn, states) or ReserveResult(False, failed, tuple(states))
            holds = amounts if reserve_mode else [0] * len(amounts)
            buckets = [
                [b.key, b.slot, b.slot + b.ttl_seconds, b.measure, amount, hold]
                for b, amount, hold in zip(request.buckets, amounts, holds, strict=True)
            ]
            # The id is new but for a retry or a replay (it is minted per admission), so the
            # insert itself is the look-up: one statement instead of a SELECT before it.
            inserted = conn.execute(
                INSERT_RESERVATION,
                (
                    request.request_id,
                    request.amount,
                    request.amount if reserve_mode else 0,
                    request.expires_at,
                    request.now,
                    json.dumps(buckets),
                    dims_json(request.dims),
                    request.binding,
                    *request.tokens,
                ),
            ).rowcount
            if not inserted:
                # The conflicting row is in this transaction's view, so `existing` finds it.
                return existing(conn, states) or ReserveResult(
                    False, (), tuple(states), conflict=True
                )
            self._add_reserved_many(
                conn, [(b.key, hold) for b, hold in zip(request.buckets, holds, strict=True)]
            )
            after = tuple(
                BucketState(s.spent, s.reserved + hold)
                for s, hold in zip(states, holds, strict=True)
            )
            return ReserveResult(True, (), after)

        return await self._tx(reserve)

    async def reservation(self, request_id: str) -> Reservation | None:
        def read(conn: sqlite3.Connection) -> Reservation | None:
            row = conn.execute(
                "SELECT state, estimate, dims, input_tokens, output_tokens FROM reservations "
                "WHERE request_id=?",
                (request_id,),
            ).fetchone()
            if row is None:
                return None
            return Reservation(
                request_id, row[0], int(row[1]), _dims(row[2]), (int(row[3]), int(row[4]))
            )

        return await self._run(read)

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
        def commit(conn: sqlite3.Connection, sink: Deltas | None) -> CommitResult:
            row, marked = _charge_row(conn, request_id)
            if row is None:
                return CommitResult("unknown")
            return self._commit_row(
                conn, request_id, row, marked, actual_micros, usage, error, others, tokens, sink
            )

        return self._found(request_id, await self._budget_tx(commit))

    async def charge(self, request_id: str, price: Pricer, now: float) -> CommitResult:
        # One job on the store's thread: the record read, priced and committed in the same
        # transaction, instead of a hop to read it and another to commit.
        result = await self._budget_tx(
            lambda conn, sink: self._charge(conn, request_id, price, sink)
        )
        return self._found(request_id, result)

    def _found(self, request_id: str, result: CommitResult) -> CommitResult:
        """A commit's result as the caller sees it: as is here; a store that admits before
        the file has the reservation turns "unknown" into "unavailable" while it is on
        its way (`sqlite_owned.py`)."""
        return result

    async def _budget_tx(self, fn: Callable[[sqlite3.Connection, Deltas | None], T]) -> T:
        """`_tx` of a job that changes budgets; `fn` gets where to note its changes
        (None: nobody keeps them beside the file)."""
        return await self._tx(lambda conn: fn(conn, None))

    async def charge_many(
        self, charges: Sequence[tuple[str, Pricer]], now: float
    ) -> list[CommitResult | Exception]:
        # A job per chunk instead of per charge: one hand-over to the store's thread and one
        # wake-up of the event loop for a whole access log batch.
        def charge_all(
            conn: sqlite3.Connection, sink: Deltas | None, chunk: Sequence[tuple[str, Pricer]]
        ) -> list[CommitResult | Exception]:
            out: list[CommitResult | Exception] = []
            # Every statement is a step of SQLite for which the store's thread gives up the
            # GIL and takes it back from the event loop, so a batch makes as few as it can:
            # its reservations read in one statement and the open ones marked committed in
            # one; its slot, hold and ledger changes written once per row at the end (the
            # calls of a batch share most of their buckets — a team's, a model's, the
            # account's — and ledger rows, and each row written is most of a charge's cost).
            records = charge_records(conn, [request_id for request_id, _ in chunk])
            deferred, ledger, charged = Deltas(), list[LedgerAdd](), list[str]()
            for request_id, price in chunk:
                # A charge that fails (its pricer raised) leaves no trace: nothing of it is
                # written before it is priced. An SQLite error fails the whole job (nothing
                # of it is committed; each charge is retried by its caller).
                mine, rows = Deltas(), list[LedgerAdd]()
                row = records.get(request_id)
                # An open reservation is marked below with the others (`marked` tells the
                # commit so); an expired one is marked by its commit (a late charge).
                is_open = row is not None and row[0] == "open"
                try:
                    result = self._commit_priced(conn, request_id, row, is_open, price, mine, rows)
                except sqlite3.Error:
                    raise
                except Exception as exc:
                    out.append(exc)
                    continue
                out.append(result)
                deferred.extend(mine)
                ledger += rows
                if row is not None and result.status in ("committed", "late"):
                    # The same id again in this batch is a replay: it finds this one's mark.
                    records[request_id] = ("committed", *row[1:])
                    if is_open:
                        charged.append(request_id)
            mark_committed(conn, charged)
            write_ledger(conn, ledger)
            slots: dict[tuple[str, int], list[int]] = {}
            for key, slot, amount, expires in deferred.spent:
                cell = slots.get((key, slot))
                if cell is None:
                    slots[key, slot] = [amount, expires]
                else:
                    cell[0] += amount
                    cell[1] = max(cell[1], expires)
            spent = [(k, s, a, e) for (k, s), (a, e) in slots.items()]
            self._add_slots_many(conn, spent)
            holds: dict[str, int] = {}
            for key, amount in deferred.held:
                holds[key] = holds.get(key, 0) + amount
            held = list(holds.items())
            self._add_reserved_many(conn, held)
            if sink is not None:
                # Summed as written: memory applies each bucket's change once, not once per
                # charge (the same sums; a digest of the key and a dict update each).
                sink.extend(Deltas(spent, held, deferred.ended))
            return out

        results: list[CommitResult | Exception] = []
        for start in range(0, len(charges), _CHARGES_PER_JOB):
            chunk = charges[start : start + _CHARGES_PER_JOB]
            try:
                results += await self._budget_tx(functools.partial(charge_all, chunk=chunk))
            except Exception as exc:  # nothing of the chunk was committed
                results += [exc] * len(chunk)
        out: list[CommitResult | Exception] = []
        for (request_id, _), result in zip(charges, results, strict=True):
            if isinstance(result, CommitResult):
                try:
                    result = self._found(request_id, result)
                except StoreUnavailable as exc:
                    result = exc
            out.append(result)
        return out

    def _charge(
        self,
        conn: sqlite3.Connection,
        request_id: str,
        price: Pricer,
        sink: Deltas | None = None,
    ) -> CommitResult:
        # What `price` raises needs no undoing here: every caller rolls this job back.
        row, marked = _charge_row(conn, request_id)
        return self._commit_priced(conn, request_id, row, marked, price, sink)

    def _commit_priced(
        self,
        conn: sqlite3.Connection,
        request_id: str,
        row: tuple[Any, ...] | None,
        marked: bool,
        price: Pricer,
        sink: Deltas | None,
        ledger: list[LedgerAdd] | None = None,
    ) -> CommitResult:
        """`_charge` once its reservation `row` is read (and `marked`, see `_charge_row`).
        With `ledger`, the slot, hold and ledger changes are only noted (in `sink` and
        `ledger`) for the caller to write, and `marked` says the caller marks the record
        once it is charged (`charge_many`): the only statement then is the one that marks
        a reservation the caller does not (a late charge)."""
        if row is None:
            return CommitResult("unknown")
        priced = price(
            Reservation(request_id, row[0], int(row[1]), _dims(row[4]), (int(row[6]), int(row[7])))
        )
        if priced is None:
            if marked and ledger is None:  # a batch marks nothing before it is priced
                _reopen(conn, request_id)
            return CommitResult("unknown")
        return self._commit_row(
            conn,
            request_id,
            row,
            marked,
            priced.micros,
            priced.usage,
            priced.error,
            priced.others,
            priced.tokens,
            sink,
            ledger,
        )

    def _commit_row(
        self,
        conn: sqlite3.Connection,
        request_id: str,
        row: tuple[Any, ...],
        marked: bool,
        actual_micros: int,
        usage: TokenUsage,
        error: bool,
        others: Sequence[LedgerPart],
        tokens: tuple[int, int] | None,
        sink: Deltas | None = None,
        ledger: list[LedgerAdd] | None = None,
    ) -> CommitResult:
        """With `ledger` (and `sink`): the slot and hold changes only go to `sink` and the
        ledger's to `ledger`, for the caller to write (`charge_many`, once per row for a
        whole batch).

        `commit` of the reservation `row` (state, estimate, held, buckets, dims,
        created_at, ...) just read in this transaction (`marked`: and already marked
        committed)."""
        actual_in, actual_out = (
            (usage.total_input, usage.output_tokens) if tokens is None else tokens
        )
        state, estimate, held, buckets_json, dims_json, created = row[:6]
        if state == "committed":
            return CommitResult("duplicate", estimate)
        # An expired reservation already paid its estimate: charge only the difference.
        is_open = state == "open"
        deferred = ledger is not None and sink is not None
        delta = actual_micros if is_open else actual_micros - estimate
        entries = _entries(buckets_json, estimate, held)
        if is_open:
            releases = [(e[0], -e[5]) for e in entries if e[5]]
            if deferred and sink is not None:  # (`deferred` says so; for the type checker)
                sink.held += releases
            else:
                self._add_reserved_many(conn, releases, sink)
            if sink is not None:
                sink.ended.append(request_id)
        charges = []
        for key, slot, expires, measure, amount, _ in entries:
            actual = measured(measure, actual_micros, actual_in, actual_out)
            # Requests count once: a late commit adds no second request.
            charges.append((key, slot, actual if is_open else actual - amount, expires))
        if deferred and sink is not None:
            sink.spent += charges
        else:
            self._add_slots_many(conn, charges, sink)
        hour = int(created) // 3600 * 3600
        moved = sum(part.cost for part in others)
        self._add_ledger(
            conn,
            hour,
            dims_json,
            delta - moved,
            1 if state == "open" else 0,
            usage,
            1 if error else 0,
            into=ledger if deferred else None,
        )
        for part in others:
            self._add_ledger(
                conn,
                hour,
                dims_to_json(part.dims),
                part.cost,
                0,
                TokenUsage(part.input_tokens, part.output_tokens),
                into=ledger if deferred else None,
            )
        if not marked:
            conn.execute(
                "UPDATE reservations SET state='committed' WHERE request_id=?", (request_id,)
            )
        return CommitResult("committed" if state == "open" else "late", estimate)

    async def bucket_states(self, buckets: list[BucketView], now: float) -> list[BucketState]:
        def read(conn: sqlite3.Connection) -> list[BucketState]:
            return [self._state(conn, b, with_slots=True) for b in buckets]

        return await self._run(read)

    async def settle_expired(self, now: float, limit: int = 500) -> int:
        def settle(conn: sqlite3.Connection, sink: Deltas | None) -> int:
            count = self._settle(conn, now, limit, sink)
            self._housekeep(conn, now)
            return count

        return await self._budget_tx(settle)

    async def add_spend(self, marker: str, spend: list[tuple[BucketView, int]]) -> bool:
        def add(conn: sqlite3.Connection, sink: Deltas | None) -> bool:
            done = conn.execute(
                "SELECT 1 FROM docs WHERE collection='backfills' AND key=?", (marker,)
            ).fetchone()
            if done is not None:
                return False
            conn.execute("INSERT INTO docs VALUES ('backfills', ?, '{}', NULL)", (marker,))
            for view, amount in spend:
                self._add_slot(
                    conn, view.key, view.slot, amount, view.slot + view.ttl_seconds, sink
                )
            return True

        return await self._budget_tx(add)

    async def open_reservations(self) -> int:
        return int(
            await self._run(
                lambda conn: conn.execute(
                    "SELECT COUNT(*) FROM reservations WHERE state='open'"
                ).fetchone()[0]
            )
        )

    # -- ledger ------------------------------------------------------------------------
    async def ledger_rows(self, start_hour: int, end_hour: int) -> list[LedgerRow]:
        def scan(conn: sqlite3.Connection) -> list[LedgerRow]:
            rows = conn.execute(
                f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE hour >= ? AND hour < ? ORDER BY hour",
                (start_hour, end_hour),
            ).fetchall()
            return [
                LedgerRow(
                    int(r[0]),
                    LedgerDims(r[1], tuple(json.loads(r[2])), r[3], r[4], r[5], r[6]),
                    int(r[7]),
                    int(r[8]),
                    int(r[9]),
                    int(r[10]),
                    int(r[11]),
                )
                for r in rows
            ]

        return await self._run(scan)
