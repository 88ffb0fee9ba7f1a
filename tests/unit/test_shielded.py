"""`shielded`: a caller's cancellation never interrupts the coroutine it awaits (its own
Task); the coroutine finishes and its outcome reaches `on_abandoned`, as with asyncio.shield."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Generator
from typing import Any

import pytest

from sidecar.shielded import shielded


class Gate:
    """A few suspensions of every kind a store makes, the middle one held until opened."""

    def __init__(self) -> None:
        self.inner: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.entered = asyncio.Event()
        self.steps: list[str] = []

    async def work(self, fail: bool = False) -> str:
        await asyncio.sleep(0)  # a bare yield
        self.steps.append("started")
        self.entered.set()
        got = await self.inner  # a future someone else completes
        await asyncio.sleep(0.001)  # a timer
        self.steps.append("done")
        if fail:
            raise ValueError("store said no")
        return got


def never_called(_: asyncio.Future[Any]) -> None:
    raise AssertionError("the caller was not cancelled")


async def test_the_outcome_is_the_coroutines() -> None:
    gate = Gate()
    asyncio.get_running_loop().call_soon(gate.inner.set_result, "reserved")
    assert await shielded(gate.work(), never_called) == "reserved"
    assert gate.steps == ["started", "done"]


async def test_an_exception_inside_reaches_the_caller_as_it_is() -> None:
    gate = Gate()
    gate.inner.set_result("x")
    with pytest.raises(ValueError, match="store said no"):
        await shielded(gate.work(fail=True), never_called)


@pytest.mark.parametrize("before", [True, False])
async def test_a_future_that_failed_is_raised_inside_the_coroutine(before: bool) -> None:
    gate = Gate()
    if before:
        gate.inner.set_exception(ConnectionError("lost"))
    else:
        asyncio.get_running_loop().call_later(
            0.001, gate.inner.set_exception, ConnectionError("lost")
        )

    async def catching() -> str:
        try:
            return await gate.work()
        except ConnectionError as err:
            return f"caught {err}"

    assert await shielded(catching(), never_called) == "caught lost"


@pytest.mark.parametrize("fail", [False, True])
async def test_a_cancelled_caller_leaves_the_coroutine_to_finish_and_report(fail: bool) -> None:
    gate = Gate()
    abandoned: asyncio.Future[asyncio.Future[str]] = asyncio.get_running_loop().create_future()
    caller = asyncio.ensure_future(shielded(gate.work(fail), abandoned.set_result))
    await gate.entered.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert not gate.inner.cancelled()  # what it waits on was not cancelled with the caller
    gate.inner.set_result("reserved")
    rest = await asyncio.wait_for(abandoned, 10)
    assert gate.steps == ["started", "done"]
    if fail:
        assert isinstance(rest.exception(), ValueError)
    else:
        assert rest.result() == "reserved"


async def test_a_cancel_after_the_wait_ended_still_finishes_the_coroutine() -> None:
    gate = Gate()
    abandoned: asyncio.Future[asyncio.Future[str]] = asyncio.get_running_loop().create_future()
    caller = asyncio.ensure_future(shielded(gate.work(), abandoned.set_result))
    await gate.entered.wait()
    gate.inner.set_result("reserved")  # the answer is in...
    caller.cancel()  # ...but the caller is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert (await asyncio.wait_for(abandoned, 10)).result() == "reserved"


async def test_a_cancel_during_a_bare_yield_still_finishes_the_coroutine() -> None:
    gate = Gate()
    gate.inner.set_result("reserved")
    abandoned: asyncio.Future[asyncio.Future[str]] = asyncio.get_running_loop().create_future()
    caller = asyncio.ensure_future(shielded(gate.work(), abandoned.set_result))
    await asyncio.sleep(0)  # the caller is now at the bare yield
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert (await asyncio.wait_for(abandoned, 10)).result() == "reserved"
    assert gate.steps == ["started", "done"]


async def test_a_future_cancelled_by_someone_else_cancels_the_coroutine_not_the_caller() -> None:
    gate = Gate()
    asyncio.get_running_loop().call_later(0.001, gate.inner.cancel)

    async def catching() -> str:
        try:
            return await gate.work()
        except asyncio.CancelledError:
            return "the store's wait was cancelled"

    assert await shielded(catching(), never_called) == "the store's wait was cancelled"


@types.coroutine
def _yields_junk() -> Generator[Any, None, None]:
    yield "not a future"


async def test_awaiting_something_that_is_not_a_future_is_an_error() -> None:
    async def junk() -> None:
        await _yields_junk()

    with pytest.raises(RuntimeError, match="bad yield"):  # as any Task says
        await shielded(junk(), never_called)


async def test_a_timeout_inside_ends_the_coroutines_wait_not_its_caller() -> None:
    # redis-py bounds its reads with asyncio.timeout, which cancels the current task: that
    # must be the coroutine's own, so its store sees a timeout and the caller an answer.
    async def slow_store() -> str:
        try:
            async with asyncio.timeout(0.001):
                await asyncio.sleep(10)
        except TimeoutError:
            return "timed out inside"
        return "no timeout"

    assert await shielded(slow_store(), never_called) == "timed out inside"
