"""Awaiting a coroutine that a cancelled caller must not interrupt.

`await shielded(coro, on_abandoned)` is `await asyncio.shield(asyncio.ensure_future(coro))`
with `task.add_done_callback(on_abandoned)` when the caller is cancelled: the coroutine runs
as a Task of its own to its end, and whoever gave up learns its outcome. It stays a Task
(code inside may bind timeouts to the current task, as redis-py's asyncio client does, and
those must cancel the store's work, not its caller); what is spared is `ensure_future`'s
and `shield`'s generic work (argument checks, two closures and an outer future with its
own callbacks): the caller waits on one plain future that the task's end completes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def shielded(
    coro: Coroutine[Any, Any, T], on_abandoned: Callable[[asyncio.Future[T]], None]
) -> T:
    loop = asyncio.get_running_loop()
    task = loop.create_task(coro)
    ended: asyncio.Future[None] = loop.create_future()

    def end(_: asyncio.Future[T]) -> None:
        if not ended.done():
            ended.set_result(None)

    task.add_done_callback(end)
    try:
        await ended
    except asyncio.CancelledError:
        task.add_done_callback(on_abandoned)
        raise
    return task.result()
