"""Incremental Server-Sent Events decoder for metering streamed provider responses."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.metering import load_json, mapping

# One event larger than this is dropped rather than buffered. The largest legitimate event
# is an OpenAI Responses `response.completed`, which repeats the whole output.
MAX_EVENT_BYTES = 8 * 1024 * 1024

# CR, LF and CRLF all end a line (WHATWG SSE). Splitting bytes is safe for UTF-8 because
# these bytes never occur inside a multi-byte sequence.
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str
    data: str


def typed_payload(event: SSEEvent) -> tuple[str, Mapping[str, object]] | None:
    """An event's JSON object and its type: the object's `type`, else the SSE event name
    (providers put it in one or both). None when the data is no JSON object."""
    payload = mapping(load_json(event.data))
    if payload is None:
        return None
    kind = payload.get("type")
    return (kind if isinstance(kind, str) else event.event), payload


class SSEDecoder:
    """Turns arbitrary byte chunks into complete events; keeps only the event being read."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._line = bytearray()
        # A chunk ending in CR may be the first half of CRLF; the LF must not count as a
        # second, empty line (which would dispatch the event early).
        self._skip_lf = False
        self._first_line = True
        self._event = ""
        self._data: list[str] = []
        self._size = 0
        # Set while the current event is too large to keep: it is skipped up to its end.
        self._oversize = False
        self._line_overflow = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        if not chunk:
            return events
        start = 1 if self._skip_lf and chunk[0] == 0x0A else 0
        self._skip_lf = False
        for match in _LINE_BREAK.finditer(chunk, start):
            piece = chunk[start : match.start()]
            if self._line or self._line_overflow or len(piece) > self._max:
                self._append(piece)
                self._take_line(events)
            else:  # a whole line within this chunk: read as is, not copied via the buffer
                self._read_line(events, piece)
            start = match.end()
        if start == len(chunk) and chunk.endswith(b"\r"):
            self._skip_lf = True
        self._append(chunk[start:])
        return events

    def close(self) -> list[SSEEvent]:
        """Flush at end of stream.

        The SSE spec discards an event without its terminating blank line. A stream cut
        short still has to be metered, so the pending event is dispatched instead.
        """
        events: list[SSEEvent] = []
        if self._line or self._line_overflow:
            self._take_line(events)
        self._dispatch(events)
        return events

    def _append(self, piece: bytes) -> None:
        if self._line_overflow:
            return
        self._line += piece
        if len(self._line) > self._max:
            self._line.clear()
            self._line_overflow = True
            self._oversize = True

    def _take_line(self, events: list[SSEEvent]) -> None:
        if self._line_overflow:
            # The end of a line too long to keep; its event is already marked as dropped.
            self._line_overflow = False
            return
        raw = bytes(self._line)
        self._line.clear()
        self._read_line(events, raw)

    def _read_line(self, events: list[SSEEvent], raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(_BOM)
        if not line:
            self._dispatch(events)
            return
        if self._oversize or line.startswith(":"):
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._size += len(raw)
            if self._size > self._max:
                self._oversize = True
                self._data = []
                return
            self._data.append(value)
        elif name == "event":
            self._event = value

    def _dispatch(self, events: list[SSEEvent]) -> None:
        if self._data and not self._oversize:
            events.append(SSEEvent(self._event or "message", "\n".join(self._data)))
        self._reset()

    def _reset(self) -> None:
        self._event = ""
        self._data = []
        self._size = 0
        self._oversize = False
