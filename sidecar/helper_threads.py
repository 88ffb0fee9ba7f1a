"""On request, the process's threads but the event loop's run as SCHED_BATCH: always, or
while the loop is saturated (`overload.batch_helper_threads`; by default they are not).

Why: a Check crosses several threads besides the loop's. gRPC's C core completes each
call's operations on its event-engine threads, which wake its completion-queue poller,
which wakes the loop; the store's writer and the access log's batches wake more. Under
SCHED_OTHER each of those wakeups may preempt the loop on its CPU, midway through a
decision, which then resumes with its caches cold. Measured through Envoy on 2 shared
cores (`python -m bench.cpu`, which prints context switches per request): 12-18 switches
per Check with the helpers as they start, 6.4 with them as SCHED_BATCH, which the kernel
never lets preempt on wakeup; throughput at saturation rose by a few percent.

The same measure costs latency below saturation: a helper that wakes on a CPU busy with
something else (Envoy, the loop) waits for that task's time slice instead of preempting
it, and p99 at 500 Checks/s rose by about 2 ms. So `auto` moves the helpers only while the
loop's thread is busy most of the time (`SATURATED` of a CPU over the last pass), when the
loop is what limits the process and a queue, not a wakeup, sets the latency; they get
their wakeup preemption back once it is clearly not (`RELIEVED`), the gap between the two
keeping a load near the line from flipping at every pass. Even so, a load that falls from
saturation to 500/s runs up to a pass with the helpers moved, and one such run had a
145 ms p99 and 18 refusals where the tree before had 9 ms: the default is `never`, and the
setting is for a sidecar that runs saturated and is measured for throughput.

No privilege is needed (moving between the two normal policies is always allowed). Linux
only; elsewhere, or where the policy cannot be set (a seccomp profile that forbids it),
nothing changes and the sidecar runs as before. Threads start at any time (gRPC grows its
pools under load), so the pass is repeated; a thread an operator gave another policy
(real-time, SCHED_IDLE) is left as it is, and so is every thread while this process has
moved none (under `never`, nothing is ever touched). `overload.batch_helper_threads`: `never` (the
default), `auto` (above) or `always`, read at every pass, so a reload applies within one.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import structlog

log = structlog.get_logger("sidecar.helper_threads")

# Often enough that a pool thread started under a burst is moved within that burst.
PASS_SECONDS = 2.0
# The loop thread's CPU over a pass, as a share of the pass's time.
SATURATED = 0.8
RELIEVED = 0.6
MIN_JUDGED_SECONDS = PASS_SECONDS / 2
Mode = Literal["auto", "always", "never"]
_TASKS = Path("/proc/self/task")
_OTHER = getattr(os, "SCHED_OTHER", 0)
_BATCH = getattr(os, "SCHED_BATCH", 3)
_SUPPORTED = hasattr(os, "sched_setscheduler") and _TASKS.is_dir()


def place_helpers(loop_tid: int, batch: bool) -> int:
    """Every thread of this process but `loop_tid` to SCHED_BATCH (`batch`) or back to
    SCHED_OTHER; threads under any other policy are left alone. Returns how many threads it
    moved. Raises OSError when a policy cannot be set."""
    want, other = (_BATCH, _OTHER) if batch else (_OTHER, _BATCH)
    moved = 0
    for name in os.listdir(_TASKS):
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


class Saturation:
    """Whether the loop's thread is saturated, judged at each `batch` call from the CPU it
    used since the previous one (`cpu`: the loop thread's clock; the caller runs on it)."""

    def __init__(
        self,
        cpu: Callable[[], float] = time.thread_time,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cpu, self._wall = cpu, wall
        self._since = (cpu(), wall())
        self.saturated = False

    def batch(self, mode: Mode) -> bool:
        cpu, wall = self._cpu(), self._wall()
        used, elapsed = cpu - self._since[0], wall - self._since[1]
        # Over a moment the running thread is always busy: only a pass's worth is judged
        # (the first pass, at start, judges nothing).
        if elapsed >= MIN_JUDGED_SECONDS:
            self._since = (cpu, wall)
            busy = used / elapsed
            self.saturated = busy >= (RELIEVED if self.saturated else SATURATED)
        return mode == "always" or (mode == "auto" and self.saturated)


async def keep_helpers_placed(
    mode: Callable[[], Mode],
    interval: float = PASS_SECONDS,
    saturation: Saturation | None = None,
) -> None:
    """Run on the loop's thread: a pass now, and again every `interval` seconds, each with
    the current `mode()` (the rule set's setting, so a reload applies at the next pass)."""
    if not _SUPPORTED:
        return
    loop_tid = threading.get_native_id()
    judge = Saturation() if saturation is None else saturation
    moved = False  # threads are only put back by the process that moved them
    while True:
        batch = judge.batch(mode())
        if batch or moved:
            try:
                place_helpers(loop_tid, batch)
            except OSError as exc:
                log.info("helper_threads_unplaced", error=str(exc))
                return
            moved = batch
        await asyncio.sleep(interval)
