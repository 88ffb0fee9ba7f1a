"""Log lines from the event loop are written once per turn, in order, and none is lost."""

from __future__ import annotations

import asyncio
import io
import os
import sys
import threading

from sidecar import log_buffer
from sidecar.log_buffer import LoopLines, OrderedPrintLogger


class CountingFile(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_lines_of_one_turn_are_written_together_at_the_next_turn_in_order() -> None:
    file = CountingFile()
    lines = LoopLines(file)

    async def main() -> None:
        for n in range(5):
            lines.write(f"line {n}")
        assert file.getvalue() == ""  # nothing yet: this turn is still running
        await asyncio.sleep(0)  # one turn of the loop (the flush was scheduled before)
        assert file.getvalue() == "".join(f"line {n}\n" for n in range(5))
        assert file.writes == 1

    asyncio.run(main())


def test_a_line_written_off_the_loop_is_written_at_once() -> None:
    file = CountingFile()
    LoopLines(file).write("alone")
    assert file.getvalue() == "alone\n"


def test_a_chain_line_comes_after_the_lines_logged_before_it() -> None:
    file = CountingFile()
    lines = LoopLines(file)

    async def main() -> None:
        lines.write("decision 1")
        OrderedPrintLogger(lines).warning("a warning")
        lines.write("decision 2")
        await asyncio.sleep(0)

    asyncio.run(main())
    assert file.getvalue() == "decision 1\na warning\ndecision 2\n"


def test_a_thread_writing_meanwhile_keeps_the_order_it_saw() -> None:
    file = CountingFile()
    lines = LoopLines(file)

    async def main() -> None:
        lines.write("on the loop")
        thread = threading.Thread(target=lines.write, args=("from a thread",))
        thread.start()
        thread.join()
        await asyncio.sleep(0)

    asyncio.run(main())
    assert file.getvalue() == "on the loop\nfrom a thread\n"


def test_lines_of_a_loop_that_stopped_before_its_turn_are_written_by_the_next() -> None:
    file = CountingFile()
    lines = LoopLines(file)

    first = asyncio.new_event_loop()

    def last_turn() -> None:
        lines.write("last of the first loop")
        first.stop()  # this turn is its last: the flush scheduled for the next never runs

    first.call_soon(last_turn)
    first.run_forever()
    first.close()
    assert file.getvalue() == ""

    async def again() -> None:
        lines.write("first of the second loop")
        await asyncio.sleep(0)

    asyncio.run(again())
    assert file.getvalue() == "last of the first loop\nfirst of the second loop\n"


def test_a_forked_child_does_not_write_its_parents_waiting_lines() -> None:
    file = CountingFile()
    configured = list(log_buffer._current)
    lines = log_buffer.loop_lines(file)
    read, write = os.pipe()

    async def main() -> None:
        lines.write("the parent's")
        pid = os.fork()
        if pid == 0:  # the child: what waits is its parent's to write
            lines.flush()
            os.write(write, file.getvalue().encode() or b"-")
            os._exit(0)
        os.waitpid(pid, 0)
        await asyncio.sleep(0)

    try:
        asyncio.run(main())
    finally:
        log_buffer._current[:] = configured
    assert os.read(read, 100) == b"-"
    assert file.getvalue() == "the parent's\n"


def test_no_line_is_lost_or_doubled_while_another_thread_logs_through_the_chain() -> None:
    file = CountingFile()
    lines = LoopLines(file)
    chain = OrderedPrintLogger(lines)
    started = threading.Event()

    def other_thread() -> None:
        started.set()
        for n in range(2_000):
            chain.warning(f"thread {n}")

    async def main() -> None:
        thread = threading.Thread(target=other_thread)
        thread.start()
        started.wait()
        for n in range(20_000):
            lines.write(f"loop {n}")
            if n % 100 == 0:
                await asyncio.sleep(0)
        thread.join()
        await asyncio.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns between nearly every two bytecodes
    try:
        asyncio.run(main())
    finally:
        sys.setswitchinterval(interval)
    written = file.getvalue().splitlines()
    assert sorted(written) == sorted(
        [f"loop {n}" for n in range(20_000)] + [f"thread {n}" for n in range(2_000)]
    )
    # Each writer's own lines stay in the order it wrote them.
    assert [w for w in written if w.startswith("loop")] == [f"loop {n}" for n in range(20_000)]
