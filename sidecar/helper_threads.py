"""The event loop keeps its CPU: every other thread of the process runs as SCHED_BATCH.

Why: a Check crosses several threads besides the loop's. gRPC's C core completes each
call's operations on its event-engine threads, which wake its completion-queue poller,
which wakes the loop; the store's writer and the access log's batches wake more. Under
SCHED_OTHER each of those wakeups may preempt the loop on its CPU, midway through a
decision, and the decision then resumes with its caches cold. Measured through Envoy on 2
shared cores (`python -m bench.cpu`, which prints context switches per request): 12-16
switches per Check with the helpers as they start, 6.4 with them as SCHED_BATCH, which the
kernel never lets preempt on wakeup; the no-op floor makes 6-8. The helpers still get their
fair share of CPU; they only wait for the loop's time slice instead of cutting into it.

No privilege is needed (moving between the two normal policies is always allowed). Linux
only; elsewhere, or where the policy cannot be set (a seccomp profile that forbids it),
nothing changes and the sidecar runs as before. Threads start at any time (gRPC grows its
pools under load), so the pass is repeated; a thread an operator gave another policy
(real-time, SCHED_IDLE) is left as it is. `overload.batch_helper_threads: false` puts them
back to SCHED_OTHER at the next pass.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("sidecar.helper_threads")

# Often enough that a pool thread started under a burst is moved within that burst.
PASS_SECONDS = 2.0
_TASKS = Path("/proc/self/task")
_OTHER = getattr(os, "SCHED_OTHER", 0)
_BATCH = getattr(os, "SCHED_BATCH", 3)
_SUPPORTED = hasattr(os, "sched_setscheduler") and _TASKS.is_dir()


def place_helpers(loop_tid: int, batch: bool, tasks: Path = _TASKS) -> int:
    """Every thread of this process but `loop_tid` to SCHED_BATCH (`batch`) or back to
    SCHED_OTHER; threads under any other policy are left alone. Returns how many threads it
    moved. Raises OSError when a policy cannot be set."""
    want, other = (_BATCH, _OTHER) if batch else (_OTHER, _BATCH)
    moved = 0
    for name in os.listdir(tasks):
        tid = int(name)
        if tid == loop_tid:
            continue
        try:
            if os.sched_getscheduler(tid) != other:
                continue
            os.sched_setscheduler(tid, want, os.sched_param(0))
        except ProcessLookupError:
            continue  # it ended between the listing and now
        moved += 1
    return moved


async def keep_helpers_placed(enabled: Callable[[], bool], interval: float = PASS_SECONDS) -> None:
    """Run on the loop's thread: a pass now, and again every `interval` seconds, each with
    the current `enabled()` (the rule set's setting, so a reload can turn it off)."""
    if not _SUPPORTED:
        return
    loop_tid = threading.get_native_id()
    while True:
        try:
            place_helpers(loop_tid, enabled())
        except OSError as exc:
            log.info("helper_threads_unplaced", error=str(exc))
            return
        await asyncio.sleep(interval)
