"""Bedrock Runtime's shapes: Converse (JSON and event stream), InvokeModel's stream, errors.

Bedrock streams in the AWS event-stream binary framing; `eventstream_message` writes one
message of it (botocore only reads the framing, so the fake writes its own, and the unit
tests check botocore reads it back).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Iterator, Mapping
from typing import Any

from sidecar.model import TokenUsage


def eventstream_message(
    event_type: str, payload: Mapping[str, Any], message_type: str = "event"
) -> bytes:
    """One AWS event-stream message: prelude (total and header lengths, CRC), string
    headers, the JSON payload, and the CRC of everything before it."""
    headers = b""
    for name, value in (
        (":event-type", event_type),
        (":content-type", "application/json"),
        (":message-type", message_type),
    ):
        raw = value.encode()
        # Header value type 7 is a string with a 2-byte length.
        headers += bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(raw)) + raw
    body = json.dumps(payload, separators=(",", ":")).encode()
    total = 12 + len(headers) + len(body) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", binascii.crc32(prelude))
    message = prelude + headers + body
    return message + struct.pack(">I", binascii.crc32(message))


def _converse_usage(usage: TokenUsage) -> dict[str, Any]:
    fields = {
        "inputTokens": usage.input_tokens,
        "outputTokens": usage.output_tokens,
        "totalTokens": usage.total_input + usage.output_tokens,
    }
    if usage.cache_read_tokens or usage.cache_write_tokens:
        fields["cacheReadInputTokens"] = usage.cache_read_tokens
        fields["cacheWriteInputTokens"] = usage.cache_write_tokens
    return fields


def converse_json(usage: TokenUsage, words: list[str], limited: bool) -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": "".join(words)}]}},
        "stopReason": "max_tokens" if limited else "end_turn",
        "usage": _converse_usage(usage),
        "metrics": {"latencyMs": 42},
    }


def converse_frames(usage: TokenUsage, words: list[str], limited: bool) -> Iterator[bytes]:
    yield eventstream_message("messageStart", {"role": "assistant"})
    for word in words:
        yield eventstream_message(
            "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": word}}
        )
    yield eventstream_message("contentBlockStop", {"contentBlockIndex": 0})
    yield eventstream_message(
        "messageStop", {"stopReason": "max_tokens" if limited else "end_turn"}
    )
    yield eventstream_message(
        "metadata", {"usage": _converse_usage(usage), "metrics": {"latencyMs": 42}}
    )


def invoke_frames(sse_frames: Iterator[bytes], usage: TokenUsage) -> Iterator[bytes]:
    """InvokeModelWithResponseStream: each Anthropic SSE event, base64 in a `chunk` event;
    the last one carries Bedrock's invocation metrics."""
    for frame in sse_frames:
        data = next(line[6:] for line in frame.decode().splitlines() if line.startswith("data: "))
        event = json.loads(data)
        if event.get("type") == "message_stop":
            event["amazon-bedrock-invocationMetrics"] = {
                "inputTokenCount": usage.input_tokens,
                "outputTokenCount": usage.output_tokens,
                "invocationLatency": 42,
                "firstByteLatency": 7,
            }
        encoded = base64.b64encode(json.dumps(event).encode()).decode()
        yield eventstream_message("chunk", {"bytes": encoded})


def error(status: int, message: str) -> dict[str, Any]:
    return {"message": message}
