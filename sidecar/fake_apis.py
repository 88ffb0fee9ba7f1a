"""The fake provider's Gemini, Bedrock Runtime and embeddings answers, shaped as the real
APIs send them; token counts come from `sidecar.fake_provider.expected_usage`.

Bedrock streams in the AWS event-stream binary framing; `eventstream_message` writes one
message of it (botocore only reads the framing, so the fake writes its own, and the unit
tests check botocore reads it back).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import struct
from collections.abc import Iterator, Mapping
from typing import Any

from sidecar.model import TokenUsage


def eventstream_message(event_type: str, payload: Mapping[str, Any],
                        message_type: str = "event") -> bytes:
    """One AWS event-stream message: prelude (total and header lengths, CRC), string
    headers, the JSON payload, and the CRC of everything before it."""
    headers = b""
    for name, value in ((":event-type", event_type), (":content-type", "application/json"),
                        (":message-type", message_type)):
        raw = value.encode()
        # Header value type 7 is a string with a 2-byte length.
        headers += bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(raw)) + raw
    body = json.dumps(payload, separators=(",", ":")).encode()
    total = 12 + len(headers) + len(body) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", binascii.crc32(prelude))
    message = prelude + headers + body
    return message + struct.pack(">I", binascii.crc32(message))


# --- Gemini ---------------------------------------------------------------------------------


def gemini_usage_metadata(usage: TokenUsage, thoughts: int) -> dict[str, Any]:
    prompt = usage.total_input
    candidates = usage.output_tokens - thoughts
    metadata: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + usage.output_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if thoughts:
        metadata["thoughtsTokenCount"] = thoughts
    if usage.cache_read_tokens:
        metadata["cachedContentTokenCount"] = usage.cache_read_tokens
        metadata["cacheTokensDetails"] = [{"modality": "TEXT",
                                           "tokenCount": usage.cache_read_tokens}]
    return metadata


def _gemini_chunk(model: str, response_id: str, text: str, usage: dict[str, Any],
                  finish: str | None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"},
                                 "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model,
            "responseId": response_id}


def gemini_json(model: str, usage: TokenUsage, thoughts: int, words: list[str],
                limited: bool) -> dict[str, Any]:
    finish = "MAX_TOKENS" if limited else "STOP"
    return _gemini_chunk(model, secrets.token_hex(8), "".join(words),
                         gemini_usage_metadata(usage, thoughts), finish)


def gemini_frames(model: str, usage: TokenUsage, thoughts: int, words: list[str],
                  limited: bool) -> Iterator[bytes]:
    """`streamGenerateContent?alt=sse`: every chunk carries the running usage so far; the
    prompt count is known from the first chunk, the output grows."""
    response_id = secrets.token_hex(8)
    finish = "MAX_TOKENS" if limited else "STOP"
    final = gemini_usage_metadata(usage, thoughts)
    for index, word in enumerate(words):
        last = index == len(words) - 1
        if last:
            running = final
        else:
            running = {"promptTokenCount": usage.total_input,
                       "candidatesTokenCount": index + 1,
                       "totalTokenCount": usage.total_input + thoughts + index + 1}
            if thoughts:
                running["thoughtsTokenCount"] = thoughts
        chunk = _gemini_chunk(model, response_id, word, running, finish if last else None)
        yield f"data: {json.dumps(chunk)}\r\n\r\n".encode()


def gemini_error(status: int, message: str) -> dict[str, Any]:
    names = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
             404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
             503: "UNAVAILABLE"}
    return {"error": {"code": status, "message": message,
                      "status": names.get(status, "UNKNOWN")}}


# --- Bedrock Runtime ------------------------------------------------------------------------


def _converse_usage(usage: TokenUsage) -> dict[str, Any]:
    fields = {"inputTokens": usage.input_tokens, "outputTokens": usage.output_tokens,
              "totalTokens": usage.total_input + usage.output_tokens}
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
        yield eventstream_message("contentBlockDelta",
                                  {"contentBlockIndex": 0, "delta": {"text": word}})
    yield eventstream_message("contentBlockStop", {"contentBlockIndex": 0})
    yield eventstream_message("messageStop",
                              {"stopReason": "max_tokens" if limited else "end_turn"})
    yield eventstream_message("metadata", {"usage": _converse_usage(usage),
                                           "metrics": {"latencyMs": 42}})


def invoke_frames(sse_frames: Iterator[bytes], usage: TokenUsage) -> Iterator[bytes]:
    """InvokeModelWithResponseStream: each Anthropic SSE event, base64 in a `chunk` event;
    the last one carries Bedrock's invocation metrics."""
    for frame in sse_frames:
        data = next(line[6:] for line in frame.decode().splitlines()
                    if line.startswith("data: "))
        event = json.loads(data)
        if event.get("type") == "message_stop":
            event["amazon-bedrock-invocationMetrics"] = {
                "inputTokenCount": usage.input_tokens, "outputTokenCount": usage.output_tokens,
                "invocationLatency": 42, "firstByteLatency": 7}
        encoded = base64.b64encode(json.dumps(event).encode()).decode()
        yield eventstream_message("chunk", {"bytes": encoded})


def bedrock_error(status: int, message: str) -> dict[str, Any]:
    return {"message": message}


# --- embeddings -----------------------------------------------------------------------------


def embeddings_json(model: str, body: Mapping[str, Any], usage: TokenUsage) -> dict[str, Any]:
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) else 1
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": [0.0, 0.5, -0.5]}
                 for i in range(count)],
        "model": model,
        "usage": {"prompt_tokens": usage.input_tokens, "total_tokens": usage.input_tokens},
    }
