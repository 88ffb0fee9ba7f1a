"""Token usage from Gemini `generateContent` bodies and `streamGenerateContent` streams.

Gemini reports `usageMetadata` with every response. In a stream (`alt=sse`, or the JSON
array the API sends without it) every chunk carries the running totals for the whole call,
so the last one seen is the usage; adding chunks up would overcharge. Thinking tokens
(`thoughtsTokenCount`) are billed as output and cached tokens (`cachedContentTokenCount`)
are part of `promptTokenCount`, as genai-prices reads them.
"""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.metering import count, load_json, mapping, modality_count, utf8_len, with_modalities
from sidecar.metering.sse import SSEEvent
from sidecar.metering.tally import StreamTally
from sidecar.model import TokenUsage


def gemini_usage(metadata: object) -> TokenUsage | None:
    """Map a `usageMetadata` object; None when it reports no token counts."""
    fields = mapping(metadata)
    if fields is None:
        return None
    prompt = count(fields.get("promptTokenCount"))
    candidates = count(fields.get("candidatesTokenCount"))
    thoughts = count(fields.get("thoughtsTokenCount"))
    if prompt is None and candidates is None and thoughts is None:
        return None
    # Tool-use prompt tokens (e.g. a Google Search result fed back in) are billed as input.
    total_input = (prompt or 0) + (count(fields.get("toolUsePromptTokenCount")) or 0)
    cached = min(count(fields.get("cachedContentTokenCount")) or 0, total_input)
    tokens = TokenUsage(
        input_tokens=total_input - cached,
        output_tokens=(candidates or 0) + (thoughts or 0),
        cache_read_tokens=cached,
    )
    # Audio, images and video are priced apart (an image model's image output at ten times
    # its text output, or more), by modality inside the same totals.
    prompt_details = fields.get("promptTokensDetails")
    output_details = fields.get("candidatesTokensDetails")
    return with_modalities(
        tokens,
        modality_count(prompt_details, "AUDIO"),
        modality_count(fields.get("cacheTokensDetails"), "AUDIO"),
        modality_count(output_details, "AUDIO"),
        image_input=modality_count(prompt_details, "IMAGE"),
        image_output=modality_count(output_details, "IMAGE"),
        video_input=modality_count(prompt_details, "VIDEO"),
        video_output=modality_count(output_details, "VIDEO"),
    )


def _chunks(body: object) -> list[Mapping[str, object]]:
    # A stream read without `alt=sse` is one JSON array of the chunks.
    items = body if isinstance(body, list) else [body]
    return [m for item in items if (m := mapping(item)) is not None]


def gemini_body_usage(body: object) -> TokenUsage | None:
    """Usage of a complete response: the last `usageMetadata` (running totals)."""
    found = None
    for chunk in _chunks(body):
        found = gemini_usage(chunk.get("usageMetadata")) or found
    return found


def candidate_text_bytes(chunk: Mapping[str, object]) -> int:
    """UTF-8 bytes of the text parts (thoughts included) and function-call arguments."""
    size = 0
    candidates = chunk.get("candidates")
    if not isinstance(candidates, list):
        return 0
    for candidate in candidates:
        fields = mapping(candidate)
        content = mapping(fields.get("content")) if fields else None
        parts = content.get("parts") if content else None
        if not isinstance(parts, list):
            continue
        for entry in parts:
            part = mapping(entry)
            if part is None:
                continue
            size += utf8_len(part.get("text"))
            call = mapping(part.get("functionCall"))
            if call is not None:
                size += len(str(call.get("args", "")))
    return size


def _finished(chunk: Mapping[str, object]) -> bool:
    candidates = chunk.get("candidates")
    return isinstance(candidates, list) and any(
        isinstance(c, Mapping) and c.get("finishReason") for c in candidates
    )


class GeminiStream(StreamTally):
    """Follows `streamGenerateContent?alt=sse`: each event is a GenerateContentResponse."""

    def __init__(self) -> None:
        super().__init__()
        self._finished = False

    def on_event(self, event: SSEEvent) -> None:
        chunk = mapping(load_json(event.data))
        if chunk is None:
            return
        self.output_bytes += candidate_text_bytes(chunk)
        usage = gemini_usage(chunk.get("usageMetadata"))
        if usage is not None:
            self.usage = usage
        self._finished = self._finished or _finished(chunk)
        # The chunk with a finishReason carries the final totals.
        self.complete = self._finished and self.usage is not None
