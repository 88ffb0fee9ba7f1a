"""Token usage from Bedrock Runtime: Converse, ConverseStream, and InvokeModel for Anthropic.

Bedrock streams in the AWS event-stream binary framing
(`application/vnd.amazon.eventstream`), not SSE: length-prefixed, CRC-checked messages whose
`:event-type` header names the event and whose payload is JSON. botocore's decoder reads
the framing; each message is handed on as an `SSEEvent(event_type, payload)` so the streams
here follow the same interface as the SSE ones.

- ConverseStream ends with a `metadata` event carrying `usage` (`inputTokens`,
  `outputTokens`, `cacheReadInputTokens`, `cacheWriteInputTokens`); `contentBlockDelta`
  events carry the text.
- InvokeModelWithResponseStream wraps the model's own events: each `chunk` event's payload
  is `{"bytes": base64(event JSON)}`. For Anthropic models those are Messages API events,
  read by the Anthropic parser.
"""

from __future__ import annotations

import base64
import binascii

from botocore.eventstream import EventStreamBuffer, ParserError

from sidecar.metering import count, load_json, mapping, utf8_len
from sidecar.metering.anthropic import MessagesStream
from sidecar.metering.sse import SSEEvent
from sidecar.metering.tally import StreamTally
from sidecar.model import Iteration, TokenUsage, ToolFees

EVENTSTREAM_MEDIA = "application/vnd.amazon.eventstream"


def converse_usage(usage: object) -> TokenUsage | None:
    """Map a Converse `usage` object; None when it reports no token counts.

    `inputTokens` excludes the cache reads and writes, which are reported beside it.
    """
    fields = mapping(usage)
    if fields is None:
        return None
    input_tokens = count(fields.get("inputTokens"))
    output = count(fields.get("outputTokens"))
    if input_tokens is None and output is None:
        return None
    return TokenUsage(
        input_tokens=input_tokens or 0,
        output_tokens=output or 0,
        cache_read_tokens=count(fields.get("cacheReadInputTokens")) or 0,
        cache_write_tokens=count(fields.get("cacheWriteInputTokens")) or 0,
    )


def converse_body_usage(body: object) -> TokenUsage | None:
    fields = mapping(body)
    return converse_usage(fields.get("usage")) if fields else None


class EventStreamDecoder:
    """Turns byte chunks into complete event-stream messages, as `SSEEvent`s.

    A framing error (bad CRC, impossible length) stops decoding: what follows cannot be
    trusted to be aligned on message boundaries. `error` is then set. botocore refuses a
    message declaring more than 16 MiB of payload, which bounds what is held between two.
    """

    def __init__(self) -> None:
        self._buffer = EventStreamBuffer()
        self.error = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self.error or not chunk:
            return []
        self._buffer.add_data(chunk)
        events: list[SSEEvent] = []
        try:
            for message in self._buffer:
                headers = message.headers
                kind = headers.get(":event-type") or headers.get(":exception-type") or ""
                if headers.get(":message-type", "event") != "event":
                    continue
                payload = message.payload.decode("utf-8", "replace")
                events.append(SSEEvent(str(kind), payload))
        except ParserError:
            self.error = True
        return events

    def close(self) -> list[SSEEvent]:
        # A message cut short cannot be checked against its CRC: it is dropped.
        return []


class ConverseStream(StreamTally):
    """Follows ConverseStream events: text from `contentBlockDelta`, usage from `metadata`."""

    def on_event(self, event: SSEEvent) -> None:
        if event.event not in ("contentBlockDelta", "metadata"):
            return
        payload = mapping(load_json(event.data))
        if payload is None:
            return
        if event.event == "contentBlockDelta":
            delta = mapping(payload.get("delta"))
            if delta is None:
                return
            self.output_bytes += utf8_len(delta.get("text"))
            tool = mapping(delta.get("toolUse"))
            self.output_bytes += utf8_len(tool.get("input")) if tool else 0
            reasoning = mapping(delta.get("reasoningContent"))
            self.output_bytes += utf8_len(reasoning.get("text")) if reasoning else 0
            return
        usage = converse_usage(payload.get("usage"))
        if usage is not None:
            self.usage = usage
            self.complete = True


class InvokeStream:
    """Follows InvokeModelWithResponseStream for Anthropic models: unwraps each `chunk` and
    hands the Messages API event inside to the Anthropic parser."""

    def __init__(self) -> None:
        self._messages = MessagesStream()

    @property
    def usage(self) -> TokenUsage | None:
        return self._messages.usage

    @property
    def complete(self) -> bool:
        return self._messages.complete

    @property
    def output_bytes(self) -> int:
        return self._messages.output_bytes

    @property
    def iterations(self) -> tuple[Iteration, ...]:
        return self._messages.iterations

    @property
    def fees(self) -> ToolFees:
        return self._messages.fees

    def on_event(self, event: SSEEvent) -> None:
        if event.event != "chunk":
            return
        payload = mapping(load_json(event.data))
        encoded = payload.get("bytes") if payload else None
        if not isinstance(encoded, str):
            return
        try:
            inner = base64.b64decode(encoded, validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return
        parsed = mapping(load_json(inner))
        kind = parsed.get("type") if parsed else None
        if isinstance(kind, str):
            self._messages.on_event(SSEEvent(kind, inner))
