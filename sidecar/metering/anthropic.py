"""Token usage from Anthropic Messages API bodies and streams."""

from __future__ import annotations

from sidecar.metering import count, load_json, mapping, utf8_len
from sidecar.metering.sse import SSEEvent
from sidecar.model import TokenUsage

# Anthropic's usage keys, in TokenUsage's terms. input_tokens already excludes cache tokens.
_FIELDS = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cache_read_input_tokens": "cache_read_tokens",
    "cache_creation_input_tokens": "cache_write_tokens",
}

_USAGE_EVENTS = frozenset({"message_start", "message_delta", "message_stop"})
# Fields of a `content_block_delta` that hold generated text (or tool input JSON).
_DELTA_TEXT = ("text", "thinking", "partial_json")


def _read(usage: object) -> dict[str, int]:
    fields = mapping(usage)
    if fields is None:
        return {}
    found: dict[str, int] = {}
    for key, name in _FIELDS.items():
        value = count(fields.get(key))
        if value is not None:
            found[name] = value
    return found


def message_usage(usage: object) -> TokenUsage | None:
    """Map a Messages API `usage` object; None when it reports no token counts."""
    found = _read(usage)
    if "input_tokens" not in found and "output_tokens" not in found:
        return None
    return TokenUsage(**found)


def message_body_usage(body: object) -> TokenUsage | None:
    fields = mapping(body)
    return message_usage(fields.get("usage")) if fields else None


class MessagesStream:
    """Follows a Messages stream: `message_start` gives input, `message_delta` the rest;
    the text of `content_block_delta` events is counted as it passes (`output_bytes`).

    Every count in a `message_delta` is the running total for the whole message, so it
    replaces what was seen before; adding deltas up would overcharge.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self.complete = False
        self.output_bytes = 0

    @property
    def usage(self) -> TokenUsage | None:
        return TokenUsage(**self._counts) if self._counts else None

    def on_event(self, event: SSEEvent) -> None:
        # Text deltas are most of a stream and carry no usage: skip parsing them by name.
        if (event.event != "message" and event.event not in _USAGE_EVENTS
                and event.event != "content_block_delta"):
            return
        payload = mapping(load_json(event.data))
        if payload is None:
            return
        kind = payload.get("type")
        if not isinstance(kind, str):
            kind = event.event
        if kind == "content_block_delta":
            delta = mapping(payload.get("delta"))
            if delta is not None:
                self.output_bytes += sum(utf8_len(delta.get(key)) for key in _DELTA_TEXT)
        elif kind == "message_start":
            message = mapping(payload.get("message"))
            self._counts.update(_read(message.get("usage") if message else None))
        elif kind == "message_delta":
            found = _read(payload.get("usage"))
            self._counts.update(found)
            # The delta carrying usage is the last one Anthropic sends before message_stop.
            self.complete = self.complete or bool(found)
        elif kind == "message_stop":
            self.complete = bool(self._counts)
