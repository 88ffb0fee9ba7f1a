"""Where a row's CPU went: the whole machine's busy time and each process group's share of it,
over the same wall-clock interval, to tell a CPU-bound row from a latency-bound one.

A closed-loop row is CPU-bound when the machine's cores are busy for the whole row (nothing
left to give) or when one single-threaded part, an event loop, is busy for the whole row
(more requests cannot go through it however idle the other core is); it is latency-bound
when neither is and the connections spend their time waiting.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.cpu import cpu_seconds
from bench.machine import children

TICKS = os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[int, int, int]:
    """(busy, interrupts, total) jiffies of all cores so far, from /proc/stat: idle and
    iowait are idle; `interrupts` (irq + softirq) is busy time no process is charged for,
    most of it here loopback TCP between our own processes."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # guest time is already counted in user
    return total - fields[3] - fields[4], fields[5] + fields[6], total


def main_thread_seconds(pid: int) -> float:
    """CPU of one process's main thread (its tid is its pid) so far: the event loop."""
    try:
        raw = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def event_loop_pids(pids: list[int]) -> list[int]:
    """The processes that run an event loop: each of `pids`, or its workers when it only
    supervises them (`sidecar serve --workers N`)."""
    out: list[int] = []
    for pid in pids:
        workers = children(pid)
        out.extend(workers or [pid])
    return out


@dataclass
class Sample:
    """Readings at the start of a row; `finish` turns them into cores busy over the row."""

    groups: dict[str, list[int]]
    loops: dict[str, list[int]]
    wall: float = field(default_factory=time.monotonic)
    machine: tuple[int, int, int] = field(default_factory=machine_jiffies)
    children_cpu: float = field(default_factory=lambda: _rusage_children())
    cpu: dict[str, float] = field(default_factory=dict)
    loop_cpu: dict[str, dict[int, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cpu = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.groups.items()}
        self.loop_cpu = {
            name: {pid: main_thread_seconds(pid) for pid in pids}
            for name, pids in self.loops.items()
        }

    def finish(self) -> dict[str, float]:
        """Cores busy (CPU seconds per second) over the row: the machine's, each group's,
        `load_generator` (the children this process waited for meanwhile: wrk),
        `interrupts` (irq and softirq), `stack` (the groups, the load generator and the
        interrupts: the whole benchmark), `others` (the machine's less the stack: other
        users of a shared machine), and per
        `loops` group, `NAME_loop`: its busiest event loop's share of one core (1.0:
        saturated)."""
        wall = time.monotonic() - self.wall
        busy, irq, total = machine_jiffies()
        cores = (os.cpu_count() or 1) / max(total - self.machine[2], 1)
        machine = (busy - self.machine[0]) * cores
        interrupts = (irq - self.machine[1]) * cores
        out = {"wall_s": wall, "machine_cores": machine, "interrupts_cores": interrupts}
        ours = 0.0
        for name, pids in self.groups.items():
            used = (sum(cpu_seconds(p) for p in pids) - self.cpu[name]) / wall
            out[f"{name}_cores"] = used
            ours += used
        wrk = (_rusage_children() - self.children_cpu) / wall
        out["load_generator_cores"] = wrk
        out["stack_cores"] = ours + wrk + interrupts
        out["others_cores"] = max(machine - ours - wrk - interrupts, 0.0)
        for name, loops in self.loop_cpu.items():
            out[f"{name}_loop"] = max(
                ((main_thread_seconds(p) - c) / wall for p, c in loops.items()), default=0.0
            )
        return out


def _rusage_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
