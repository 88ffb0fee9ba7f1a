"""Log lines written on the event loop, handed to the file once per turn of the loop.

Every Check writes a decision line; a `write(2)` (and a flush through the text layer) per
line was a system call per request, and more where stderr is a pipe whose reader wakes up
for each. Lines written during one turn of the loop are joined and written together at the
start of the next turn, in the order they were written. A line written off the loop (a
thread, a synchronous caller) first hands over what is waiting, then is written at once; so
does every line of the structlog chain (`OrderedPrintLogger`): the file sees lines in the
order they were logged. What a `kill -9` can lose is the lines of the turn it interrupts;
a normal exit writes them (`atexit`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import threading
from typing import Any, TextIO

import structlog


class LoopLines:
    def __init__(self, file: TextIO) -> None:
        self.file = file
        self._lines: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # Reentrant: a file whose write logs (a test's, a wrapper's) must not deadlock.
        self._lock = threading.RLock()

    def write(self, line: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # off the loop: at once, after what waits
            self.put_after_waiting(line)
            return
        with self._lock:
            # Under the lock: a flush from another thread swaps the list, and a line
            # appended to the one it took would be lost.
            schedule = not self._lines or loop is not self._loop
            self._lines.append(line)
            if schedule:
                self._loop = loop
        if schedule:
            # Nothing was waiting, or it waited for a loop that is not this one (it stopped
            # before its turn came): this loop's next turn writes them.
            try:
                loop.call_soon(self.flush)
            except RuntimeError:  # the loop is closing: no next turn
                self.flush()

    def flush(self) -> None:
        with self._lock:
            self._put_waiting()

    def put_after_waiting(self, line: str) -> None:
        """Write what waits and then `line`, in one write with nothing in between."""
        with self._lock:
            self._put_waiting(line)

    def _put_waiting(self, line: str | None = None) -> None:
        lines, self._lines = self._lines, []
        if line is not None:
            lines.append(line)
        if lines:
            lines.append("")
            self._put("\n".join(lines))

    def forget(self) -> None:
        """Drop what is waiting (a forked child: its parent writes those lines)."""
        self._lines = []
        self._loop = None

    def _put(self, text: str) -> None:
        self.file.write(text)
        self.file.flush()


class OrderedPrintLogger(structlog.PrintLogger):
    """structlog's PrintLogger, writing what `lines` holds first."""

    def __init__(self, lines: LoopLines) -> None:
        super().__init__(lines.file)
        self._lines = lines

    def msg(self, message: str) -> None:
        self._lines.put_after_waiting(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class OrderedPrintLoggerFactory:
    def __init__(self, lines: LoopLines) -> None:
        self._lines = lines

    def __call__(self, *args: Any) -> OrderedPrintLogger:
        return OrderedPrintLogger(self._lines)


_current: list[LoopLines] = []


def loop_lines(file: TextIO) -> LoopLines:
    """A `LoopLines` for `file`, written out at exit and emptied in a forked child; the one
    made before (a set-up made again) writes what it holds first."""
    _flush_all()
    _current[:] = [LoopLines(file)]
    return _current[0]


def _flush_all() -> None:
    for lines in _current:
        # At exit the file may be gone already: nothing more to do then.
        with contextlib.suppress(OSError, ValueError):
            lines.flush()


def _forget_all() -> None:
    for lines in _current:
        lines.forget()


atexit.register(_flush_all)
os.register_at_fork(after_in_child=_forget_all)
