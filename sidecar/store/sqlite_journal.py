"""The reservation journal of a SQLite file owned by one process.

A reservation is admitted in process memory (`sidecar/store/sqlite_totals.py`) and must
survive the process being killed the moment after: before the answer leaves, its record is
appended to a journal segment with one `write(2)`, which puts it in the kernel's page cache
— the same durability SQLite gives a commit with `synchronous=NORMAL` in WAL mode (it
survives the process, not the machine). Records reach the SQLite file in batches; a segment
is removed once every record in it has been committed there, and the segments still on disk
when the file is opened again are replayed into it first (inserting an id that is already
there does nothing, so a replay can repeat).

A record is one line of tab-separated fields: none of them can hold a tab or a newline (ids
and bindings are hex, the bucket and dimension lists are JSON, numbers are `repr`s).
"""

from __future__ import annotations

import os
from pathlib import Path

# The columns of a `reservations` row that a record carries, in the table's order without
# `state` (always 'open' when journaled).
Record = tuple[str, int, int, float, float, str, str, str, int, int]
_FIELDS = 10


def encode(record: Record) -> bytes:
    rid, estimate, held, expires, created, buckets, dims, binding, tin, tout = record
    return (
        f"{rid}\t{estimate}\t{held}\t{expires!r}\t{created!r}\t{buckets}\t{dims}\t{binding}"
        f"\t{tin}\t{tout}\n"
    ).encode()


def decode(line: str) -> Record | None:
    """The record of one journal line; None for a line that is not one (the tail of a
    write the machine did not finish)."""
    fields = line.rstrip("\n").split("\t")
    if len(fields) != _FIELDS or not line.endswith("\n"):
        return None
    try:
        return (
            fields[0],
            int(fields[1]),
            int(fields[2]),
            float(fields[3]),
            float(fields[4]),
            fields[5],
            fields[6],
            fields[7],
            int(fields[8]),
            int(fields[9]),
        )
    except ValueError:
        return None


class Journal:
    """Segments `<file>.reservations-<n>`, appended to one at a time."""

    def __init__(self, db_path: str) -> None:
        path = Path(db_path)
        self._dir = path.parent
        self._prefix = path.name + ".reservations-"
        self._fd: int | None = None
        self._current: Path | None = None
        self._next = 1 + max((n for n, _ in self._numbered()), default=0)

    def _numbered(self) -> list[tuple[int, Path]]:
        out = []
        for p in self._dir.glob(self._prefix + "*"):
            tail = p.name[len(self._prefix) :]
            if tail.isdigit():
                out.append((int(tail), p))
        return sorted(out)

    def segments(self) -> list[Path]:
        """The segments on disk, oldest first."""
        return [p for _, p in self._numbered()]

    @staticmethod
    def read(segment: Path) -> list[Record]:
        with segment.open(encoding="utf-8", newline="") as f:
            return [r for line in f if (r := decode(line)) is not None]

    def append(self, record: Record) -> None:
        """Write one record; OSError (disk full, I/O) means it is not journaled."""
        if self._fd is None:
            path = self._dir / f"{self._prefix}{self._next:012d}"
            # Owner-only from the first byte: records name users and their spend.
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            self._current = path
            self._next += 1
        data = encode(record)
        while data:
            data = data[os.write(self._fd, data) :]

    def seal(self) -> Path | None:
        """Close the segment being appended to and return it (None: nothing was written
        since the last seal); the next record starts a new one."""
        if self._fd is None:
            return None
        os.close(self._fd)
        sealed, self._fd, self._current = self._current, None, None
        return sealed

    @staticmethod
    def remove(segments: list[Path]) -> None:
        for segment in segments:
            segment.unlink(missing_ok=True)
