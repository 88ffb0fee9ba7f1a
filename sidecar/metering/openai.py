"""Token usage from OpenAI chat completions and Responses API bodies and streams."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from sidecar.metering import count, load_json, mapping, utf8_len, with_modalities
from sidecar.metering.sse import SSEEvent, typed_payload
from sidecar.metering.tally import StreamTally
from sidecar.model import Iteration, TokenUsage, ToolFees

# Terminal Responses API events; each carries the final response object, usage included.
_RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Responses API events whose `delta` is generated text (or tool-call arguments).
_RESPONSES_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
    }
)
_CHAT_DELTA_TEXT = ("content", "reasoning_content", "reasoning", "refusal")
_OUTPUT_ITEM_DONE = "response.output_item.done"


def _fee_kind(item: Mapping[str, object]) -> str | None:
    """Which per-call fee a Responses output item incurs, if any.

    OpenAI bills a `web_search_call` whose action is a search; opening a page or finding in
    it is not a search. An item without an action is counted: billing one search too many
    is the safer mistake.
    """
    kind = item.get("type")
    if kind == "web_search_call":
        action = mapping(item.get("action"))
        return "web" if action is None or action.get("type") in (None, "search") else None
    if kind == "file_search_call":
        return "file"
    return None


def _fees(kinds: Mapping[str, str]) -> ToolFees:
    values = list(kinds.values())
    return ToolFees(web_searches=values.count("web"), file_searches=values.count("file"))


def _output_fee_kinds(output: object) -> dict[str, str]:
    """Fee-bearing items of a Responses `output` list, by item id (or position)."""
    kinds: dict[str, str] = {}
    if not isinstance(output, list):
        return kinds
    for index, entry in enumerate(output):
        item = mapping(entry)
        fee = _fee_kind(item) if item is not None else None
        if item is not None and fee is not None:
            item_id = item.get("id")
            kinds[item_id if isinstance(item_id, str) else f"#{index}"] = fee
    return kinds


def responses_body_fees(body: object) -> ToolFees:
    """Per-call tool fees of a complete Responses body."""
    fields = mapping(body)
    return _fees(_output_fee_kinds(fields.get("output") if fields else None))


def _split_cached(
    total_input: int,
    details: Mapping[str, object] | None,
    output: int,
    output_details: Mapping[str, object] | None = None,
) -> TokenUsage:
    # OpenAI counts cached tokens inside the prompt total; TokenUsage keeps them apart.
    cached = count(details.get("cached_tokens")) if details else None
    # Not sent by OpenAI itself, but by OpenAI-compatible routers (OpenRouter) that do
    # report cache writes inside the same prompt total.
    written = count(details.get("cache_write_tokens")) if details else None
    cached = min(cached or 0, total_input)
    written = min(written or 0, total_input - cached)
    tokens = TokenUsage(
        input_tokens=total_input - cached - written,
        output_tokens=output,
        cache_read_tokens=cached,
        cache_write_tokens=written,
    )
    # Audio (gpt-audio models) is priced apart, inside the same totals.
    cached_details = mapping(details.get("cached_tokens_details")) if details else None
    return with_modalities(
        tokens,
        (count(details.get("audio_tokens")) or 0) if details else 0,
        (count(cached_details.get("audio_tokens")) or 0) if cached_details else 0,
        (count(output_details.get("audio_tokens")) or 0) if output_details else 0,
    )


def _usage(usage: object, prefix: str, output_key: str) -> TokenUsage | None:
    """A `usage` object whose input count is `<prefix>_tokens`, its cache details
    `<prefix>_tokens_details` and its output count `output_key`; None when it reports
    nothing (the two APIs name the same counts differently)."""
    fields = mapping(usage)
    if fields is None:
        return None
    total_input = count(fields.get(f"{prefix}_tokens"))
    output = count(fields.get(output_key))
    if total_input is None and output is None:
        return None
    output_prefix = output_key.removesuffix("_tokens")
    return _split_cached(
        total_input or 0,
        mapping(fields.get(f"{prefix}_tokens_details")),
        output or 0,
        mapping(fields.get(f"{output_prefix}_tokens_details")),
    )


def chat_usage(usage: object) -> TokenUsage | None:
    """Map a chat completions `usage` object; None when it reports nothing."""
    return _usage(usage, "prompt", "completion_tokens")


def responses_usage(usage: object) -> TokenUsage | None:
    """Map a Responses API `usage` object; None when it reports nothing."""
    return _usage(usage, "input", "output_tokens")


def chat_body_usage(body: object) -> TokenUsage | None:
    fields = mapping(body)
    return chat_usage(fields.get("usage")) if fields else None


def responses_body_usage(body: object) -> TokenUsage | None:
    fields = mapping(body)
    return responses_usage(fields.get("usage")) if fields else None


class ChatStream(StreamTally):
    """Follows `chat.completion.chunk` events; usage comes in a final chunk with no choices.

    OpenAI only sends it when the request set `stream_options.include_usage`. Some
    compatible servers repeat a running usage in every chunk, so the last one wins. The
    generated text is counted as it passes (`output_bytes`), for a stream that ends without
    usage.
    """

    def on_event(self, event: SSEEvent) -> None:
        if event.data.strip() == "[DONE]":
            self.complete = self.usage is not None
            return
        chunk = mapping(load_json(event.data))
        if chunk is None:
            return
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                self.output_bytes += _delta_bytes(mapping(choice))
        usage = chat_usage(chunk.get("usage"))
        if usage is None:
            return
        self.usage = usage
        if not choices:
            self.complete = True


def _delta_bytes(choice: Mapping[str, object] | None) -> int:
    delta = mapping(choice.get("delta")) if choice else None
    if delta is None:
        return 0
    size = sum(utf8_len(delta.get(key)) for key in _CHAT_DELTA_TEXT)
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            fields = mapping(call)
            function = mapping(fields.get("function")) if fields else None
            if function is not None:
                size += utf8_len(function.get("arguments"))
    return size


class ResponsesStream:
    """Follows Responses API events; usage only arrives with the terminal event, generated
    text in the delta events before it."""

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.complete = False
        self.output_bytes = 0
        self.iterations: tuple[Iteration, ...] = ()
        # Fee-bearing tool calls by item id: from each finished item as it passes (a stream
        # cut short still pays for its searches), then from the terminal event's output.
        self._fee_kinds: dict[str, str] = {}

    @property
    def fees(self) -> ToolFees:
        return _fees(self._fee_kinds)

    def on_event(self, event: SSEEvent) -> None:
        # Other named events carry neither usage, generated text nor a finished tool call:
        # skip parsing them.
        if (
            event.event != "message"
            and event.event not in _RESPONSES_TERMINAL
            and event.event not in _RESPONSES_DELTAS
            and event.event != _OUTPUT_ITEM_DONE
        ):
            return
        typed = typed_payload(event)
        if typed is None:
            return
        kind, payload = typed
        if kind in _RESPONSES_DELTAS:
            self.output_bytes += utf8_len(payload.get("delta"))
            return
        if kind == _OUTPUT_ITEM_DONE:
            item = mapping(payload.get("item"))
            fee = _fee_kind(item) if item is not None else None
            if item is not None and fee is not None:
                item_id = item.get("id")
                key = item_id if isinstance(item_id, str) else f"#{payload.get('output_index')}"
                self._fee_kinds[key] = fee
            return
        if kind not in _RESPONSES_TERMINAL:
            return
        response = mapping(payload.get("response"))
        if response is not None:
            self._fee_kinds.update(_output_fee_kinds(response.get("output")))
        usage = responses_usage(response.get("usage")) if response else None
        if usage is not None:
            self.usage = usage
            self.complete = True


def images_body_usage(body: object) -> TokenUsage | None:
    """An images API body's usage (gpt-image models), read as genai-prices' extractor reads
    it: image input tokens apart; output tokens as image tokens only where the body says
    how many are (for gpt-image-1 all output is image, priced alike)."""
    found = _usage_counts(body)
    if found is None:
        return None
    usage, tin, tout = found
    given = mapping(usage.get("input_tokens_details"))
    produced = mapping(usage.get("output_tokens_details"))
    return with_modalities(
        TokenUsage(input_tokens=tin, output_tokens=tout),
        0,
        0,
        0,
        image_input=(count(given.get("image_tokens")) or 0) if given else 0,
        image_output=(count(produced.get("image_tokens")) or 0) if produced else 0,
    )


def speech_body_usage(body: object) -> TokenUsage | None:
    """A speech stream's usage (`speech.audio.done`, gpt-4o-mini-tts): the text read as
    input, the audio spoken as output (audio tokens, at the model's audio rate where it has
    one)."""
    found = _usage_counts(body)
    if found is None:
        return None
    _, tin, tout = found
    return with_modalities(TokenUsage(input_tokens=tin, output_tokens=tout), 0, 0, tout)


def _usage_counts(body: object) -> tuple[Mapping[str, Any], int, int] | None:
    """A body's `usage` and its `input_tokens` and `output_tokens` (0 where one is
    missing); None when it reports neither."""
    fields = mapping(body)
    usage = mapping(fields.get("usage")) if fields else None
    if usage is None:
        return None
    tin, tout = count(usage.get("input_tokens")), count(usage.get("output_tokens"))
    if tin is None and tout is None:
        return None
    return usage, tin or 0, tout or 0


# The images API reports `usage` as the last member of its body (and of a stream's final
# `image_generation.completed` event), after base64 images of megabytes, and a speech
# stream in its last event (`speech.audio.done`), after the base64 audio: it is read from
# the body's last bytes, as the first `"usage": {` that follows a `{` or `,` from the end.
# Inside a JSON string that text has its quotes escaped, so it cannot be matched there.
TAIL_BYTES = 16 * 1024
_CLOSING_USAGE = re.compile(rb'[{,]\s*"usage"\s*:\s*(?=\{)')
_DECODER = json.JSONDecoder()


def closing_usage(end: bytes, parse: Callable[[object], TokenUsage | None]) -> TokenUsage | None:
    """The usage a body (or stream) ends with, by `parse` of `{"usage": ...}`; None when
    its last bytes hold none."""
    matches = list(_CLOSING_USAGE.finditer(end))
    if not matches:
        return None
    found = matches[-1]
    try:
        usage, _ = _DECODER.raw_decode(end[found.end() :].decode("utf-8", "replace"))
    except ValueError:
        return None
    return parse({"usage": usage})
