"""Keep a benchmark's client on one core and the redis-servers it starts on another.

On a machine of two cores shared by the client and several redis-servers, the scheduler
moves them between cores and each wakes up with caches another evicted; a Redis Cluster
node suffers most (three nodes and the client take turns). `pinned()` puts this process
(and whatever it starts from now on, which inherits it) on the first allowed core, and a
thread moves every redis-server that descends from this process (those of a baseline run
in a subprocess included) with all its threads onto the second, within a tenth of a second
of its start. Linux only (`/proc`, `sched_setaffinity`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_POLL_SECONDS = 0.1


def _parents() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command name) of every process now running."""
    found: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        found[int(entry.name)] = (ppid, comm)
    return found


def _descends_from(pid: int, ancestor: int, parents: dict[int, tuple[int, str]]) -> bool:
    while pid > 1 and pid in parents:
        if pid == ancestor:
            return True
        pid = parents[pid][0]
    return pid == ancestor


def _pin_all_threads(pid: int, cores: set[int]) -> None:
    try:
        threads = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return
    for tid in threads:
        with contextlib.suppress(OSError):  # ended meanwhile
            os.sched_setaffinity(tid, cores)


@contextmanager
def pinned() -> Iterator[tuple[int, int]]:
    """Pin as the module says; yields (client core, redis core)."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit(f"--pin needs two cores, this process may use {allowed}")
    client, server = allowed[0], allowed[1]
    os.sched_setaffinity(0, {client})
    me = os.getpid()
    done = threading.Event()

    def pin_servers() -> None:
        while not done.wait(_POLL_SECONDS):
            parents = _parents()
            for pid, (_, comm) in parents.items():
                if comm == "redis-server" and _descends_from(pid, me, parents):
                    _pin_all_threads(pid, {server})

    thread = threading.Thread(target=pin_servers, name="pin-redis", daemon=True)
    thread.start()
    try:
        yield client, server
    finally:
        done.set()
        thread.join()
        os.sched_setaffinity(0, set(allowed))
