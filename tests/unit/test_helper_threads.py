"""The event loop's helper threads run as SCHED_BATCH, moved by a pass over /proc/self/task
that leaves the loop's own thread and any thread under another policy alone."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator

import pytest

from sidecar.helper_threads import keep_helpers_placed, place_helpers


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


async def test_the_task_follows_the_setting_at_every_pass(helper: Helper) -> None:
    enabled = True
    task = asyncio.create_task(keep_helpers_placed(lambda: enabled, interval=0))
    try:
        # The first pass runs before the task's first wait; one turn of the loop runs it.
        await asyncio.sleep(0)
        assert policy(helper.tid) == os.SCHED_BATCH
        assert policy(threading.get_native_id()) == os.SCHED_OTHER
        enabled = False  # a reload that turns it off
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert policy(helper.tid) == os.SCHED_OTHER
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_policy_the_system_refuses_stops_the_task_and_changes_nothing(
    helper: Helper, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(tid: int, policy: int, param: os.sched_param) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    task = asyncio.create_task(keep_helpers_placed(lambda: True, interval=0))
    await asyncio.wait_for(task, 5)  # ends instead of retrying forever
    assert task.exception() is None
    assert policy(helper.tid) == os.SCHED_OTHER
