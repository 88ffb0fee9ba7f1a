"""SQLite statements of many rows at once, for the store's batches.

Each statement is one step of SQLite, and the thread running it (the store's one thread,
`sqlite_worker.py`) lets go of the GIL around every step and takes it back after: with the
event loop busy, every step is a hand-off of the GIL and a pair of context switches on a
small machine. A statement per reservation or per charge made those hand-offs a cost of
every Check (README "A statement on the store's thread is a GIL hand-off"), so batches
write and read their rows here, a statement per chunk. The chunks stay under 999 bound
parameters, the smallest limit any SQLite version has had.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from sidecar.store.sqlite_journal import Record

# A new open reservation; an id already there (a replay, or a journal replayed twice) is
# left as it is.
INSERT_RESERVATION = (
    "INSERT INTO reservations VALUES (?, 'open', ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(request_id) DO NOTHING"
)

LEDGER_COLUMNS = (
    "hour, user, groups, token, kind, model, provider, cost, requests, "
    "input_tokens, output_tokens, errors"
)

# Reservations per multi-row insert: 10 parameters a row.
_RESERVATIONS_PER_STATEMENT = 99


@functools.lru_cache(maxsize=_RESERVATIONS_PER_STATEMENT)
def _insert_reservations_sql(rows: int) -> str:
    row = "(?, 'open', ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    return (
        f"INSERT INTO reservations VALUES {', '.join([row] * rows)} "
        "ON CONFLICT(request_id) DO NOTHING"
    )


def insert_reservations(conn: sqlite3.Connection, records: Sequence[Record]) -> list[int]:
    """Write `records` as INSERT_RESERVATION does, up to 99 in one statement; returns the
    indexes of those whose id was already there (left as it was).

    One statement is one step of SQLite, and the thread running it lets go of the GIL and
    takes it back once per step: a statement per record made the store's thread contend
    with the event loop for the GIL twice a reservation under load (measured: futex calls
    and context switches of both threads per Check)."""
    taken: list[int] = []
    for start in range(0, len(records), _RESERVATIONS_PER_STATEMENT):
        chunk = records[start : start + _RESERVATIONS_PER_STATEMENT]
        conn.execute("SAVEPOINT reservations")
        params = [value for record in chunk for value in record]
        written = conn.execute(_insert_reservations_sql(len(chunk)), params).rowcount
        if written != len(chunk):
            # Some id was there already (nearly never: minted ids do not repeat): undone,
            # and written one at a time to tell which.
            conn.execute("ROLLBACK TO reservations")
            taken += [
                start + i
                for i, record in enumerate(chunk)
                if not conn.execute(INSERT_RESERVATION, record).rowcount
            ]
        conn.execute("RELEASE reservations")
    return taken


# A ledger row's key (hour, user, groups, token, kind, model, provider) and what it adds
# (cost, requests, input tokens, output tokens, errors).
LedgerAdd = tuple[tuple[Any, ...], list[int]]
# Ledger rows per multi-row upsert: 12 parameters a row.
_LEDGER_ROWS_PER_STATEMENT = 83


@functools.lru_cache(maxsize=_LEDGER_ROWS_PER_STATEMENT)
def _ledger_sql(rows: int) -> str:
    return (
        f"INSERT INTO ledger ({LEDGER_COLUMNS}) VALUES "
        + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
        + " ON CONFLICT(hour, user, groups, token, kind, model, provider) DO UPDATE SET "
        "cost = cost + excluded.cost, requests = requests + excluded.requests, "
        "input_tokens = input_tokens + excluded.input_tokens, "
        "output_tokens = output_tokens + excluded.output_tokens, "
        "errors = errors + excluded.errors"
    )


def write_ledger(conn: sqlite3.Connection, rows: Sequence[LedgerAdd]) -> None:
    """Add `rows` to the ledger, those with the same key summed first (the calls of a
    batch share a few callers and models), up to 83 rows a statement."""
    summed: dict[tuple[Any, ...], list[int]] = {}
    adds: list[int]
    for key, adds in rows:
        cell = summed.get(key)
        if cell is None:
            summed[key] = list(adds)
        else:
            for i, value in enumerate(adds):
                cell[i] += value
    items = list(summed.items())
    for start in range(0, len(items), _LEDGER_ROWS_PER_STATEMENT):
        chunk = items[start : start + _LEDGER_ROWS_PER_STATEMENT]
        params: list[object] = []
        for key, adds in chunk:
            params += key
            params += adds
        conn.execute(_ledger_sql(len(chunk)), params)


# Reservation ids per statement of a batch's read and mark.
_IDS_PER_STATEMENT = 900


def _in_list(count: int) -> str:
    return ", ".join(["?"] * count)


def charge_records(
    conn: sqlite3.Connection, request_ids: Sequence[str]
) -> dict[str, tuple[Any, ...]]:
    """The record `sqlite_store._charge_row` reads, of each of `request_ids` that exists,
    read (not marked) in one statement returning one row per 900 ids: a row per
    reservation would be a step each.
    Its creation time is given in whole seconds (it only dates the ledger's hour), which
    the JSON carries exactly."""
    unique = list(dict.fromkeys(request_ids))
    records: dict[str, tuple[Any, ...]] = {}
    for start in range(0, len(unique), _IDS_PER_STATEMENT):
        chunk = unique[start : start + _IDS_PER_STATEMENT]
        (text,) = conn.execute(
            "SELECT json_group_array(json_array(request_id, state, estimate, held, buckets, "
            "dims, CAST(created_at AS INTEGER), input_tokens, output_tokens)) "
            f"FROM reservations WHERE request_id IN ({_in_list(len(chunk))})",
            chunk,
        ).fetchone()
        for record in json.loads(text):
            records[record[0]] = tuple(record[1:])
    return records


def mark_committed(conn: sqlite3.Connection, request_ids: Sequence[str]) -> None:
    for start in range(0, len(request_ids), _IDS_PER_STATEMENT):
        chunk = request_ids[start : start + _IDS_PER_STATEMENT]
        conn.execute(
            "UPDATE reservations SET state = 'committed' "
            f"WHERE request_id IN ({_in_list(len(chunk))})",
            chunk,
        )
