"""The event loop's helper threads run as SCHED_BATCH while the loop is saturated (or
always, or never, as configured), moved by a pass over /proc/self/task that leaves the
loop's own thread and any thread under another policy alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from sidecar.helper_threads import (
    MIN_JUDGED_SECONDS,
    Mode,
    Saturation,
    keep_helpers_placed,
    place_helpers,
)


class Helper:
    """A thread that waits until stopped; its tid is known once it runs."""

    def __init__(self) -> None:
        self.started, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.tid = 0

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        self.started.set()
        self.stop.wait()

    def __enter__(self) -> Helper:
        self.thread.start()
        assert self.started.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def helper() -> Iterator[Helper]:
    with Helper() as running:
        yield running


def policy(tid: int) -> int:
    return os.sched_getscheduler(tid)


def test_a_pass_moves_other_threads_to_batch_and_leaves_the_loops_thread(helper: Helper) -> None:
    me = threading.get_native_id()
    assert policy(helper.tid) == os.SCHED_OTHER
    moved = place_helpers(me, batch=True)
    assert moved >= 1
    assert policy(helper.tid) == os.SCHED_BATCH
    assert policy(me) == os.SCHED_OTHER
    # A second pass has nothing left to move.
    assert place_helpers(me, batch=True) == 0
    place_helpers(me, batch=False)
    assert policy(helper.tid) == os.SCHED_OTHER


def test_a_thread_an_operator_gave_another_policy_is_left_alone(helper: Helper) -> None:
    os.sched_setscheduler(helper.tid, os.SCHED_IDLE, os.sched_param(0))
    place_helpers(threading.get_native_id(), batch=True)
    assert policy(helper.tid) == os.SCHED_IDLE
    place_helpers(threading.get_native_id(), batch=False)
    assert policy(helper.tid) == os.SCHED_IDLE


class Clocks:
    """The loop thread's CPU clock and the wall clock, moved by the test."""

    def __init__(self) -> None:
        self.cpu = self.wall = 0.0

    def run(self, seconds: float, busy: float) -> None:
        self.wall += seconds
        self.cpu += seconds * busy


def test_auto_batches_once_the_loop_is_saturated_and_stops_once_clearly_not() -> None:
    clocks = Clocks()
    judge = Saturation(cpu=lambda: clocks.cpu, wall=lambda: clocks.wall)
    assert judge.batch("auto") is False  # at start: nothing judged
    clocks.run(2, busy=0.7)
    assert judge.batch("auto") is False  # busy, but below the line
    clocks.run(2, busy=0.85)
    assert judge.batch("auto") is True
    clocks.run(2, busy=0.65)
    assert judge.batch("auto") is True  # between the lines: unchanged
    clocks.run(2, busy=0.5)
    assert judge.batch("auto") is False
    clocks.run(2, busy=0.75)
    assert judge.batch("auto") is False  # between the lines again: unchanged


def test_a_moment_is_not_judged_however_busy() -> None:
    clocks = Clocks()
    judge = Saturation(cpu=lambda: clocks.cpu, wall=lambda: clocks.wall)
    clocks.run(MIN_JUDGED_SECONDS / 10, busy=1.0)
    assert judge.batch("auto") is False
    # The moment counts toward the next judgement, which then sees the whole span.
    clocks.run(MIN_JUDGED_SECONDS, busy=0.0)
    assert judge.batch("auto") is False


def test_always_and_never_ignore_the_load() -> None:
    clocks = Clocks()
    judge = Saturation(cpu=lambda: clocks.cpu, wall=lambda: clocks.wall)
    clocks.run(2, busy=0.0)
    assert judge.batch("always") is True
    clocks.run(2, busy=1.0)
    assert judge.batch("never") is False
    assert judge.batch("auto") is True


@contextlib.asynccontextmanager
async def placing(
    mode: Callable[[], Mode], saturation: Saturation | None = None
) -> AsyncIterator[None]:
    """The placing task, every 0 s, through its first pass (which runs before its first
    wait: one turn of the loop runs it)."""
    task = asyncio.create_task(keep_helpers_placed(mode, 0, saturation))
    try:
        await asyncio.sleep(0)
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def next_pass() -> None:
    """Two turns of the loop: the task wakes from its wait and runs its next pass."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_the_task_follows_the_setting_at_every_pass(helper: Helper) -> None:
    mode: Mode = "always"
    async with placing(lambda: mode):
        assert policy(helper.tid) == os.SCHED_BATCH
        assert policy(threading.get_native_id()) == os.SCHED_OTHER
        mode = "never"  # a reload that turns it off
        await next_pass()
        assert policy(helper.tid) == os.SCHED_OTHER


async def test_auto_follows_the_loops_load(helper: Helper) -> None:
    clocks = Clocks()
    judge = Saturation(cpu=lambda: clocks.cpu, wall=lambda: clocks.wall)
    async with placing(lambda: "auto", judge):
        assert policy(helper.tid) == os.SCHED_OTHER
        clocks.run(2, busy=0.95)
        await next_pass()
        assert policy(helper.tid) == os.SCHED_BATCH
        clocks.run(2, busy=0.1)
        await next_pass()
        assert policy(helper.tid) == os.SCHED_OTHER


async def test_never_touches_a_thread_an_operator_made_batch(helper: Helper) -> None:
    os.sched_setscheduler(helper.tid, os.SCHED_BATCH, os.sched_param(0))
    async with placing(lambda: "never"):
        await next_pass()
        assert policy(helper.tid) == os.SCHED_BATCH
    os.sched_setscheduler(helper.tid, os.SCHED_OTHER, os.sched_param(0))


async def test_a_policy_the_system_refuses_stops_the_task_and_changes_nothing(
    helper: Helper, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(tid: int, policy: int, param: os.sched_param) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    task = asyncio.create_task(keep_helpers_placed(lambda: "always", interval=0))
    await asyncio.wait_for(task, 5)  # ends instead of retrying forever
    assert task.exception() is None
    assert policy(helper.tid) == os.SCHED_OTHER
