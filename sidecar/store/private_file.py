"""SQLite files (the store, the spool) are created readable by their owner only: they hold
service-token hashes, sealed secrets, spend by person; a shared host must not read them."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_MODE = 0o600
# SQLite gives its side files the main file's mode when it creates them; older ones, left
# by an earlier version, are tightened here.
_SIDE_FILES = ("-wal", "-shm", "-journal")


def make_private(path: str) -> None:
    """Create `path` empty with mode 0600 if missing; tighten it and its side files if not."""
    if path == ":memory:" or path.startswith("file:"):
        return
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    # O_CREAT with the mode: no moment exists when the file is there with the umask's mode.
    os.close(os.open(file, os.O_CREAT | os.O_RDWR, PRIVATE_MODE))
    for candidate in (file, *(file.with_name(file.name + s) for s in _SIDE_FILES)):
        try:
            if candidate.stat().st_mode & 0o777 != PRIVATE_MODE:
                os.chmod(candidate, PRIVATE_MODE)
        except FileNotFoundError:
            continue
