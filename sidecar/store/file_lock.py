"""Which processes may use a SQLite file together, held as a lock beside it.

A `sidecar serve` that keeps the file's budgets in its memory must be the file's only user
(`flock` exclusive); the processes of `sidecar serve --workers N` share it (`flock`
shared), each transaction taking SQLite's own write lock. The two kinds exclude each other,
so neither can start beside the other and make the budgets inexact. The kernel drops the
lock with the process, however it ends.
"""

from __future__ import annotations

import fcntl
import os

from sidecar.store.base import StoreUnavailable


class FileLock:
    def __init__(self, db_path: str, *, exclusive: bool) -> None:
        self._path = db_path + ".lock"
        self._exclusive = exclusive
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if self._exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if self._exclusive:
                raise StoreUnavailable(
                    f"sqlite: {self._path[: -len('.lock')]} is in use by another process; a "
                    "`sidecar serve` keeps the file's budgets in its memory and must be its only "
                    "user unless `store.shared: true` is set for every process using the file "
                    "(or use `sidecar serve --workers N`, or a Redis store)"
                ) from None
            raise StoreUnavailable(
                f"sqlite: {self._path[: -len('.lock')]} is in use by a `sidecar serve` that "
                "keeps its budgets in memory; set `store.shared: true` in its config so that "
                "other processes may use the file"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
