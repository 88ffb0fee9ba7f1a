"""Gemini's `generateContent` and `streamGenerateContent?alt=sse` shapes and errors."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

from sidecar.model import TokenUsage


def gemini_usage_metadata(usage: TokenUsage, thoughts: int) -> dict[str, Any]:
    prompt = usage.total_input
    candidates = usage.output_tokens - thoughts
    metadata: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + usage.output_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if usage.output_image_tokens:
        metadata["candidatesTokensDetails"] = [
            {"modality": "IMAGE", "tokenCount": usage.output_image_tokens}
        ]
    audio = usage.input_audio_tokens + usage.cache_audio_read_tokens
    if audio:
        metadata["promptTokensDetails"] = [
            {"modality": "TEXT", "tokenCount": prompt - audio},
            {"modality": "AUDIO", "tokenCount": audio},
        ]
    if thoughts:
        metadata["thoughtsTokenCount"] = thoughts
    if usage.cache_read_tokens:
        metadata["cachedContentTokenCount"] = usage.cache_read_tokens
        metadata["cacheTokensDetails"] = [
            {"modality": "TEXT", "tokenCount": usage.cache_read_tokens}
        ]
    return metadata


def _gemini_chunk(
    model: str, response_id: str, text: str, usage: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    candidate: dict[str, Any] = {
        "content": {"parts": [{"text": text}], "role": "model"},
        "index": 0,
    }
    if finish is not None:
        candidate["finishReason"] = finish
    return {
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": response_id,
    }


def gemini_json(
    model: str, usage: TokenUsage, thoughts: int, words: list[str], limited: bool
) -> dict[str, Any]:
    finish = "MAX_TOKENS" if limited else "STOP"
    return _gemini_chunk(
        model, secrets.token_hex(8), "".join(words), gemini_usage_metadata(usage, thoughts), finish
    )


def gemini_frames(
    model: str, usage: TokenUsage, thoughts: int, words: list[str], limited: bool
) -> Iterator[bytes]:
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
            running = {
                "promptTokenCount": usage.total_input,
                "candidatesTokenCount": index + 1,
                "totalTokenCount": usage.total_input + thoughts + index + 1,
            }
            if thoughts:
                running["thoughtsTokenCount"] = thoughts
        chunk = _gemini_chunk(model, response_id, word, running, finish if last else None)
        yield f"data: {json.dumps(chunk)}\r\n\r\n".encode()


def error(status: int, message: str) -> dict[str, Any]:
    names = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        503: "UNAVAILABLE",
    }
    return {"error": {"code": status, "message": message, "status": names.get(status, "UNKNOWN")}}
