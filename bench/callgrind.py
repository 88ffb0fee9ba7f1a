"""Counting a running process's instructions with valgrind's callgrind, phase by phase.

The process runs under `argv(out)` with counting off; `counted(pid, out, work)` zeroes the
counters, counts while `work()` runs, and reads the count from the dump it then asks for.
Instructions do not move with the machine's load, as wall-clock CPU does on a shared one.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def argv(out: Path) -> list[str]:
    """The argv prefix running a program under callgrind, counting nothing until told."""
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--instr-atstart=no"]


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def counted(pid: int, out: Path, work: Callable[[], object]) -> tuple[int, float]:
    """Instructions process `pid` (running under `argv(out)`) executes while `work()` runs,
    and the seconds it ran."""
    before = set(out.parent.glob(out.name + ".*"))
    control(pid, "-z")
    control(pid, "-i", "on")
    started = time.monotonic()
    work()
    elapsed = time.monotonic() - started
    control(pid, "-i", "off")
    control(pid, "--dump")
    new = sorted(set(out.parent.glob(out.name + ".*")) - before)
    if len(new) != 1:
        raise RuntimeError(f"expected one new callgrind dump, found {new}")
    # `totals`: counted since the zeroing (`summary` is since the last dump, 0 here).
    found = re.search(r"^totals: (\d+)", new[0].read_text(errors="replace"), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no instruction count in {new[0]}")
    return int(found.group(1)), elapsed


def idle(seconds: float) -> Callable[[], None]:
    """A phase of `seconds` doing nothing: the process's own timers, to subtract."""
    return lambda: time.sleep(seconds)  # the idle stretch itself, not a wait for anything
