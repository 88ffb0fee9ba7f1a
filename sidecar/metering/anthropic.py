"""Token usage from Anthropic Messages API bodies and streams.

Besides the top-level token counts, Anthropic bills two things reported elsewhere in `usage`:
`iterations` (each sampling step of one request: the message itself, a context compaction,
an advisor call billed at the advisor model's rates) and `server_tool_use` counters (web
searches, billed per search).
"""

from __future__ import annotations

from sidecar.metering import count, mapping, utf8_len
from sidecar.metering.sse import SSEEvent, typed_payload
from sidecar.model import Iteration, TokenUsage, ToolFees

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
    creation = mapping(fields.get("cache_creation"))
    one_hour = count(creation.get("ephemeral_1h_input_tokens")) if creation else None
    if one_hour is not None:
        found["cache_write_1h_tokens"] = min(one_hour, found.get("cache_write_tokens", 0))
    return found


def iterations(usage: object) -> tuple[Iteration, ...] | None:
    """`usage.iterations`, or None when the usage has none. An entry without counts stays,
    with zero tokens: its type is still worth a log line."""
    fields = mapping(usage)
    listed = fields.get("iterations") if fields else None
    if not isinstance(listed, list):
        return None
    found = []
    for entry in listed:
        item = mapping(entry)
        if item is None:
            continue
        kind, model = item.get("type"), item.get("model")
        found.append(
            Iteration(
                kind if isinstance(kind, str) else "",
                TokenUsage(**_read(item)),
                model if isinstance(model, str) else "",
            )
        )
    return tuple(found)


def web_searches(usage: object) -> int | None:
    """`usage.server_tool_use.web_search_requests` (billed per search); None when absent."""
    fields = mapping(usage)
    tools = mapping(fields.get("server_tool_use")) if fields else None
    if tools is None:
        return None
    return count(tools.get("web_search_requests")) or 0


def inference_geo(usage: object) -> str | None:
    """`usage.inference_geo`, where the model ran (billed by it); None when absent."""
    fields = mapping(usage)
    geo = fields.get("inference_geo") if fields else None
    return geo if isinstance(geo, str) else None


def tool_fees(usage: object) -> ToolFees:
    """What a complete `usage` bills beyond its tokens' standard price."""
    return ToolFees(web_searches=web_searches(usage) or 0, inference_geo=inference_geo(usage) or "")


def message_usage(usage: object) -> TokenUsage | None:
    """Map a Messages API `usage` object; None when it reports no token counts."""
    found = _read(usage)
    if "input_tokens" not in found and "output_tokens" not in found:
        return None
    return TokenUsage(**found)


def message_body_usage(body: object) -> TokenUsage | None:
    fields = mapping(body)
    return message_usage(fields.get("usage")) if fields else None


def message_body_extras(body: object) -> tuple[tuple[Iteration, ...], ToolFees]:
    """Iterations and per-call fees of a complete Messages body."""
    fields = mapping(body)
    usage = fields.get("usage") if fields else None
    return iterations(usage) or (), tool_fees(usage)


class MessagesStream:
    """Follows a Messages stream: `message_start` gives input, `message_delta` the rest;
    the text of `content_block_delta` events is counted as it passes (`output_bytes`).

    Every count in a `message_delta` is the running total for the whole message, so it
    replaces what was seen before; adding deltas up would overcharge. The same holds for
    `iterations` and `server_tool_use`, which only the final `message_delta` carries in full.
    (With compaction, `message_start` reports the compaction step's counts and the final
    delta the message's; the iterations are what holds both.) `inference_geo` is kept from
    whichever event said it last, so a later event without it does not drop it.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self.complete = False
        self.output_bytes = 0
        self.iterations: tuple[Iteration, ...] = ()
        self._web_searches = 0
        self._geo = ""

    @property
    def usage(self) -> TokenUsage | None:
        return TokenUsage(**self._counts) if self._counts else None

    @property
    def fees(self) -> ToolFees:
        return ToolFees(web_searches=self._web_searches, inference_geo=self._geo)

    def on_event(self, event: SSEEvent) -> None:
        # Text deltas are most of a stream and carry no usage: skip parsing them by name.
        if (
            event.event != "message"
            and event.event not in _USAGE_EVENTS
            and event.event != "content_block_delta"
        ):
            return
        typed = typed_payload(event)
        if typed is None:
            return
        kind, payload = typed
        if kind == "content_block_delta":
            delta = mapping(payload.get("delta"))
            if delta is not None:
                self.output_bytes += sum(utf8_len(delta.get(key)) for key in _DELTA_TEXT)
        elif kind == "message_start":
            message = mapping(payload.get("message"))
            self._update(message.get("usage") if message else None)
        elif kind == "message_delta":
            found = self._update(payload.get("usage"))
            # The delta carrying usage is the last one Anthropic sends before message_stop.
            self.complete = self.complete or bool(found)
        elif kind == "message_stop":
            self.complete = bool(self._counts)

    def _update(self, usage: object) -> dict[str, int]:
        found = _read(usage)
        self._counts.update(found)
        steps = iterations(usage)
        if steps is not None:
            self.iterations = steps
        searches = web_searches(usage)
        if searches is not None:
            self._web_searches = searches
        geo = inference_geo(usage)
        if geo is not None:
            self._geo = geo
        return found
