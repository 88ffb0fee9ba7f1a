"""Usage metering for the response path, plus the JSON readers its parsers share.

Entry point: `sidecar.metering.parse.UsageMeter`. Nothing here does I/O; provider JSON is
untrusted, so every reader answers None for a missing or mistyped value instead of raising.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import replace

from sidecar import untrusted_json
from sidecar.model import TokenUsage


def count(value: object) -> int | None:
    """A token count from JSON, or None when absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return max(int(value), 0)


def mapping(value: object) -> Mapping[str, object] | None:
    # JSON objects are dicts: checked first, the ABC check costs several times more.
    return value if type(value) is dict or isinstance(value, Mapping) else None


def load_json(data: str | bytes) -> object:
    """Parse JSON, answering None for anything malformed: one bad event must not stop metering."""
    try:
        return untrusted_json.loads(data)
    except ValueError:
        return None


def utf8_len(value: object) -> int:
    """UTF-8 bytes of a string from JSON; 0 for anything else."""
    if not isinstance(value, str):
        return 0
    return len(value) if value.isascii() else len(value.encode("utf-8", "replace"))


# Keys under which providers put generated text, reasoning and tool-call arguments.
TEXT_KEYS = frozenset(
    {
        "content",
        "text",
        "thinking",
        "arguments",
        "refusal",
        "reasoning_content",
        "reasoning",
        "partial_json",
    }
)


def generated_text_bytes(root: object) -> int:
    """UTF-8 bytes of the generated text in a complete response body: every string under a
    `TEXT_KEYS` key, and tool inputs given as objects. Walks with an explicit stack: the
    nesting depth is the provider's to choose."""
    total = 0
    stack: list[tuple[str, object]] = [("", root)]
    while stack:
        key, item = stack.pop()
        if isinstance(item, str):
            if key in TEXT_KEYS:
                total += utf8_len(item)
        elif isinstance(item, Mapping):
            if key == "input" and item:
                # Anthropic tool_use input: the model generated it as JSON text.
                total += len(json.dumps(item, separators=(",", ":")))
                continue
            stack.extend((str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((key, v) for v in item)
    return total


def modality_count(details: object, modality: str) -> int:
    """Gemini's `*TokensDetails`: the `tokenCount` of the entry for `modality` (0 if none)."""
    if not isinstance(details, list):
        return 0
    total = 0
    for entry in details:
        fields = mapping(entry)
        if fields is not None and fields.get("modality") == modality:
            total += count(fields.get("tokenCount")) or 0
    return total


def with_modalities(
    usage: TokenUsage,
    audio_input: int,
    cached_audio: int,
    audio_output: int,
    *,
    image_input: int = 0,
    image_output: int = 0,
    video_input: int = 0,
    video_output: int = 0,
) -> TokenUsage:
    """`usage` with its audio, image and video parts set, from counts as providers report
    them: `audio_input` includes the cached audio, `cached_audio` is part of the cache
    reads. Each part is bounded by the count it is part of (pricing bounds them together),
    so a report cannot make one count larger."""
    if not (
        audio_input
        or cached_audio
        or audio_output
        or image_input
        or image_output
        or video_input
        or video_output
    ):
        return usage
    cached = min(cached_audio, audio_input, usage.cache_read_tokens)
    return replace(
        usage,
        input_audio_tokens=min(audio_input - cached, usage.input_tokens),
        cache_audio_read_tokens=cached,
        output_audio_tokens=min(audio_output, usage.output_tokens),
        input_image_tokens=min(image_input, usage.input_tokens),
        output_image_tokens=min(image_output, usage.output_tokens),
        input_video_tokens=min(video_input, usage.input_tokens),
        output_video_tokens=min(video_output, usage.output_tokens),
    )
