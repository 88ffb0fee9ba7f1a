"""OpenAI's shapes: Chat Completions and Responses (JSON and SSE), embeddings, images (JSON
and SSE), errors."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator, Mapping
from typing import Any

from devtools.fake_provider.reply import Reply, sse
from sidecar.model import TokenUsage


def _chat_usage(usage: TokenUsage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.total_input,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_input + usage.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cache_read_tokens,
            "audio_tokens": usage.input_audio_tokens + usage.cache_audio_read_tokens,
        },
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": usage.output_audio_tokens,
        },
    }


def _responses_usage(usage: TokenUsage) -> dict[str, Any]:
    return {
        "input_tokens": usage.total_input,
        "input_tokens_details": {"cached_tokens": usage.cache_read_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_input + usage.output_tokens,
    }


def _stop(reply: Reply) -> str:
    return "length" if reply.limited else "stop"


def _chat_base(reply: Reply, kind: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{reply.id}",
        "object": kind,
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": "fp_fake",
    }


def chat_json(reply: Reply) -> dict[str, Any]:
    message = {"role": "assistant", "content": reply.text, "refusal": None}
    return {
        **_chat_base(reply, "chat.completion"),
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": _stop(reply)}
        ],
        "usage": _chat_usage(reply.usage),
    }


def chat_frames(reply: Reply) -> Iterator[bytes]:
    options = reply.body.get("stream_options")
    with_usage = isinstance(options, dict) and options.get("include_usage") is True

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        frame = {**_chat_base(reply, "chat.completion.chunk"), "choices": [choice]}
        if with_usage:
            frame["usage"] = None
        return sse(frame)

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    for word in reply.words:
        yield chunk({"content": word})
    yield chunk({}, _stop(reply))
    if with_usage:
        base = _chat_base(reply, "chat.completion.chunk")
        yield sse({**base, "choices": [], "usage": _chat_usage(reply.usage)})
    yield b"data: [DONE]\n\n"


def _item(reply: Reply, status: str) -> dict[str, Any]:
    done = status == "completed"
    part = {"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}
    return {
        "id": f"msg_{reply.id}",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [part] if done else [],
    }


def _response(reply: Reply, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    done = status == "completed"
    return {
        "id": f"resp_{reply.id}",
        "object": "response",
        "created_at": reply.created,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": reply.body.get("instructions"),
        "max_output_tokens": reply.body.get("max_output_tokens"),
        "model": reply.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": _responses_usage(reply.usage) if done else None,
        "metadata": {},
    }


def responses_json(reply: Reply) -> dict[str, Any]:
    return _response(reply, "completed", [_item(reply, "completed")])


def responses_frames(reply: Reply) -> Iterator[bytes]:
    sequence = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(sequence), **fields}, kind)

    at = {"item_id": f"msg_{reply.id}", "output_index": 0, "content_index": 0}
    empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield event("response.created", response=_response(reply, "in_progress", []))
    yield event("response.in_progress", response=_response(reply, "in_progress", []))
    yield event("response.output_item.added", output_index=0, item=_item(reply, "in_progress"))
    yield event("response.content_part.added", **at, part=empty_part)
    for word in reply.words:
        yield event("response.output_text.delta", **at, delta=word, logprobs=[])
    yield event("response.output_text.done", **at, text=reply.text, logprobs=[])
    done = _item(reply, "completed")
    yield event("response.content_part.done", **at, part=done["content"][0])
    yield event("response.output_item.done", output_index=0, item=done)
    yield event("response.completed", response=_response(reply, "completed", [done]))


def embeddings_json(model: str, body: Mapping[str, Any], usage: TokenUsage) -> dict[str, Any]:
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) else 1
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": [0.0, 0.5, -0.5]} for i in range(count)
        ],
        "model": model,
        "usage": {"prompt_tokens": usage.input_tokens, "total_tokens": usage.input_tokens},
    }


# An image as the API sends it, base64: larger than the part of a body Envoy's metering
# filter keeps (1 MiB), so its usage, after it, is read from the body's last bytes.
IMAGE_B64 = "iVBORw0KGgo" + "A" * (1_200_000 - 11)


def _images_usage(usage: TokenUsage) -> dict[str, Any]:
    # gpt-image-1's shape: no output details (all its output is image).
    return {
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "input_tokens_details": {"text_tokens": usage.input_tokens, "image_tokens": 0},
    }


def _image_settings(body: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "background": "opaque",
        "output_format": "png",
        "quality": body.get("quality") or "high",
        "size": body.get("size") or "1024x1024",
    }


def images_json(body: Mapping[str, Any], usage: TokenUsage) -> dict[str, Any]:
    count = body.get("n")
    images = count if isinstance(count, int) and count > 0 else 1
    return {
        "created": 1_700_000_000,
        "data": [{"b64_json": IMAGE_B64} for _ in range(images)],
        **_image_settings(body),
        "usage": _images_usage(usage),
    }


def images_frames(body: Mapping[str, Any], usage: TokenUsage) -> Iterator[bytes]:
    partial = body.get("partial_images")
    for index in range(partial if isinstance(partial, int) else 0):
        event = {
            "type": "image_generation.partial_image",
            "b64_json": IMAGE_B64[:65_536],
            "created_at": 1_700_000_000,
            **_image_settings(body),
            "partial_image_index": index,
        }
        yield sse(event, event["type"])
    done = {
        "type": "image_generation.completed",
        "b64_json": IMAGE_B64,
        "created_at": 1_700_000_000,
        **_image_settings(body),
        "usage": _images_usage(usage),
    }
    yield sse(done, done["type"])


# Audio as a speech answer sends it (an MP3 frame header, then silence), per audio token.
AUDIO_PER_TOKEN = b"\xff\xf3\x44\xc4" + bytes(60)


def speech_audio(usage: TokenUsage) -> bytes:
    """The speech API's answer as audio (`stream_format: "audio"`, the default)."""
    return AUDIO_PER_TOKEN * usage.output_tokens


def speech_frames(usage: TokenUsage) -> Iterator[bytes]:
    """The speech API's event stream: the audio in base64 deltas, then `speech.audio.done`
    with the usage."""
    audio = base64.b64encode(speech_audio(usage)).decode()
    step = 32_768
    for start in range(0, len(audio), step):
        yield sse({"type": "speech.audio.delta", "audio": audio[start : start + step]})
    usage_fields = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }
    yield sse({"type": "speech.audio.done", "usage": usage_fields})


def error(status: int, message: str) -> dict[str, Any]:
    if status == 429:
        kind, code = "requests", "rate_limit_exceeded"
    else:
        kind, code = ("server_error" if status >= 500 else "invalid_request_error"), None
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
