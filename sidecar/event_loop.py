"""The event loop `sidecar serve` runs on: uvloop, unless SIDECAR_EVENT_LOOP=asyncio.

Measured through Envoy with the benchmark policy (bench/cpu.py, README "Performance"):
uvloop takes CPU off every Check (the loop's own bookkeeping, the self-pipe wake-ups the
store thread sends, the timers) and grpc.aio runs on it unchanged. The stdlib loop stays
selectable for comparing the two and for debugging with asyncio's debug mode.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
ENV = "SIDECAR_EVENT_LOOP"


def loop_name(environ: dict[str, str] | None = None) -> str:
    """ "uvloop" or "asyncio"; anything else in the variable is an error, not a silent default."""
    name = (os.environ if environ is None else environ).get(ENV, "uvloop").strip().lower()
    if name not in ("uvloop", "asyncio"):
        raise ValueError(f"{ENV} must be 'uvloop' or 'asyncio', not {name!r}")
    return name


def run(main: Coroutine[Any, Any, T]) -> T:
    if loop_name() == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
