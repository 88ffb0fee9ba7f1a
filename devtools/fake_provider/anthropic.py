"""Anthropic's Messages shapes (JSON and SSE) and errors; Bedrock's InvokeModel wraps them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from devtools.fake_provider.reply import Reply, sse

_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def _usage(reply: Reply, output_tokens: int) -> dict[str, Any]:
    usage = reply.usage
    found: dict[str, Any] = {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
        "output_tokens": output_tokens,
    }
    # Where the model ran, as Anthropic reports it when the request chose (its default is
    # "global"; US-only inference is billed at 1.1x).
    geo = reply.body.get("inference_geo")
    if isinstance(geo, str):
        found["inference_geo"] = geo
    return found


def _stop(reply: Reply) -> str:
    return "max_tokens" if reply.limited else "end_turn"


def messages_json(reply: Reply) -> dict[str, Any]:
    return {
        "id": f"msg_{reply.id}",
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": [{"type": "text", "text": reply.text}],
        "stop_reason": _stop(reply),
        "stop_sequence": None,
        "usage": _usage(reply, reply.usage.output_tokens),
    }


def messages_frames(reply: Reply) -> Iterator[bytes]:
    start = {**messages_json(reply), "content": [], "stop_reason": None}
    start["usage"] = _usage(reply, 1)
    yield sse({"type": "message_start", "message": start}, "message_start")
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    yield sse(block, "content_block_start")
    yield sse({"type": "ping"}, "ping")
    for word in reply.words:
        text = {"type": "text_delta", "text": word}
        yield sse({"type": "content_block_delta", "index": 0, "delta": text}, "content_block_delta")
    yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    # Anthropic's usage here is the running total for the message, not an increment.
    final = {
        "type": "message_delta",
        "delta": {"stop_reason": _stop(reply), "stop_sequence": None},
        "usage": {"output_tokens": reply.usage.output_tokens},
    }
    yield sse(final, "message_delta")
    yield sse({"type": "message_stop"}, "message_stop")


def error(status: int, message: str) -> dict[str, Any]:
    kind = _ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}
