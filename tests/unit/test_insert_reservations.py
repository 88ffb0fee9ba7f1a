"""Reservations written to the SQLite file many to a statement: each one exactly as the
one-row insert writes it, and an id already there reported and left as it was."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sidecar.store.sqlite_batch import INSERT_RESERVATION, insert_reservations
from sidecar.store.sqlite_journal import Record
from sidecar.store.sqlite_store import SQLiteStore


def _conn(path: Path) -> sqlite3.Connection:
    return SQLiteStore(str(path))._connect()


def _record(n: int, binding: str = "b") -> Record:
    # Amounts, times with fractions, and text as a Check writes them.
    return (
        f"id-{n}",
        1_000 + n,
        1_000 + n,
        1_800_000_300.123456 + n,
        1_800_000_000.654321 + n,
        f'[["k{n}",1,2,"usd",{1_000 + n},{1_000 + n}]]',
        '{"user":"ana"}',
        binding,
        10 + n,
        20 + n,
    )


def _rows(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
    return conn.execute("SELECT * FROM reservations ORDER BY request_id").fetchall()


def test_many_reservations_are_written_as_the_one_row_insert_writes_each(tmp_path: Path) -> None:
    records = [_record(n) for n in range(250)]  # three statements: 99, 99, 52
    one, many = _conn(tmp_path / "one.db"), _conn(tmp_path / "many.db")
    for record in records:
        one.execute(INSERT_RESERVATION, record)
    assert insert_reservations(many, records) == []
    assert len(_rows(many)) == 250
    assert _rows(many) == _rows(one)
    assert not many.in_transaction  # its savepoints all released


def test_an_id_already_there_is_reported_and_left_as_it_was(tmp_path: Path) -> None:
    conn = _conn(tmp_path / "s.db")
    conn.execute(INSERT_RESERVATION, _record(120, binding="first"))
    records = [_record(n, binding="second") for n in range(200)]
    assert insert_reservations(conn, records) == [120]
    rows = {row[0]: row for row in _rows(conn)}
    assert len(rows) == 200
    assert rows["id-120"][8] == "first"  # the binding column: the earlier row, untouched
    assert {row[8] for key, row in rows.items() if key != "id-120"} == {"second"}


def test_the_same_id_twice_in_one_batch_is_written_once(tmp_path: Path) -> None:
    conn = _conn(tmp_path / "s.db")
    records = [_record(1), _record(2), _record(1, binding="again")]
    assert insert_reservations(conn, records) == [2]
    assert [row[0] for row in _rows(conn)] == ["id-1", "id-2"]
    assert _rows(conn)[0][8] == "b"
