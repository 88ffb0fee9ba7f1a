"""Takes the usage event the sidecar asked for out of an OpenAI chat stream.

Metering sets `stream_options.include_usage` on every chat stream (a caller cannot switch
metering off). A client that did not ask for usage itself must not see the extra event the
provider then sends before `data: [DONE]`: a chunk with `"choices": []` and a `usage`
object. This filter passes the stream through event by event and drops that one.

Bytes are held back only while an event is incomplete (its terminating blank line has not
arrived yet), so a client never waits for anything it could already use; a complete event
that is not the usage event passes at once. Works on the body as it is on the wire, so it
only runs on identity-encoded responses (the request asks upstream for identity encoding).
"""

from __future__ import annotations

import re

from sidecar.metering import load_json, mapping

# The end of an SSE event: a blank line, in any of the three line-break styles.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
# An event larger than this is passed on rather than held (a usage chunk is a few hundred
# bytes).
_MAX_HELD = 64 * 1024


def _is_usage_event(event: bytes) -> bool:
    if b'"usage"' not in event or not _EMPTY_CHOICES.search(event):
        return False
    data = b"".join(
        line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
    )
    chunk = mapping(load_json(data))
    return (
        chunk is not None and chunk.get("choices") == [] and mapping(chunk.get("usage")) is not None
    )


class UsageEventFilter:
    """Feed it the response body; it returns what the client should receive."""

    def __init__(self) -> None:
        self._held = b""
        self.removed = 0

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        out: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(data):
            event = data[start : match.end()]
            if _is_usage_event(event):
                self.removed += 1
            else:
                out.append(event)
            start = match.end()
        rest = data[start:]
        if len(rest) > _MAX_HELD:
            out.append(rest)
            rest = b""
        self._held = rest
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def flush(self) -> bytes:
        """At the end of the body: whatever was held (an unterminated last event)."""
        held, self._held = self._held, b""
        if held and _is_usage_event(held):
            self.removed += 1
            return b""
        return held
