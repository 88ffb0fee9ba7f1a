"""The usage the fake provider reports: a pure function of the request body, so a test can
compute the cost the sidecar should charge without trusting the sidecar."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from sidecar.metering.parse import Api
from sidecar.model import TokenUsage

INPUT_OVERHEAD_TOKENS = 8
DEFAULT_OUTPUT_TOKENS = 20
MAX_OUTPUT_TOKENS = 2000
# Gemini thinking: the thought tokens a request with a thinking budget reports, at most.
GEMINI_MAX_THOUGHTS = 24

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
_INPUT_KEYS: Mapping[Api, tuple[str, ...]] = {
    "openai_chat": ("messages",),
    "openai_responses": ("instructions", "input"),
    "anthropic_messages": ("system", "messages"),
    "openai_embeddings": ("input",),
    "gemini": ("systemInstruction", "contents"),
    "bedrock_converse": ("system", "messages"),
    "bedrock_invoke": ("system", "messages"),
}
# Output limits, each a path of keys into the body.
_LIMIT_KEYS: Mapping[Api, tuple[tuple[str, ...], ...]] = {
    "openai_chat": (("max_completion_tokens",), ("max_tokens",), ("max_output_tokens",)),
    "openai_responses": (("max_output_tokens",), ("max_completion_tokens",), ("max_tokens",)),
    "anthropic_messages": (("max_tokens",), ("max_completion_tokens",), ("max_output_tokens",)),
    "openai_embeddings": (),
    "gemini": (("generationConfig", "maxOutputTokens"),),
    "bedrock_converse": (("inferenceConfig", "maxTokens"),),
    "bedrock_invoke": (("max_tokens",),),
}


def _text(value: Any) -> str:
    """Every piece of text in a message, content list, or content part."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(item) for item in value)
    if isinstance(value, dict):
        return _text(value.get("text")) + _text(value.get("content")) + _text(value.get("parts"))
    return ""


def _has_cache_control(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_cache_control(item) for item in value)
    return isinstance(value, dict) and (
        "cache_control" in value or any(_has_cache_control(v) for v in value.values())
    )


def requested_output(api: Api, body: Mapping[str, Any]) -> int | None:
    """The output-token limit the request sets, if any."""
    for keys in _LIMIT_KEYS[api]:
        value: Any = body
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def gemini_thoughts(body: Mapping[str, Any]) -> int:
    """Thought tokens Gemini reports for `body`: its thinking budget, capped."""
    config = body.get("generationConfig")
    thinking = config.get("thinkingConfig") if isinstance(config, dict) else None
    # The API takes both spellings; google-genai sends the snake-case one here.
    budget = (
        thinking.get("thinkingBudget", thinking.get("thinking_budget"))
        if isinstance(thinking, dict)
        else None
    )
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        return 0
    return min(budget, GEMINI_MAX_THOUGHTS)


def _has_audio_part(value: Any) -> bool:
    """Whether Gemini contents hold an audio part (`inlineData` of an audio type)."""
    if isinstance(value, list):
        return any(_has_audio_part(item) for item in value)
    if not isinstance(value, dict):
        return False
    inline = value.get("inlineData", value.get("inline_data"))
    if isinstance(inline, dict):
        mime = inline.get("mimeType", inline.get("mime_type"))
        if isinstance(mime, str) and mime.startswith("audio/"):
            return True
    return _has_audio_part(value.get("parts"))


def expected_usage(api: Api, body: Mapping[str, Any]) -> TokenUsage:
    """The usage this provider reports for `body`: `_text_usage`, and audio. An OpenAI chat
    request asking for audio (`modalities` with "audio") reports half its uncached input
    and all its output as audio; a Gemini request with an audio part, half its uncached
    input; a Gemini request whose `generationConfig.responseModalities` names IMAGE, all
    its output but thoughts as image. An images request: `image_usage`; a speech request:
    `speech_usage`."""
    if api == "openai_images":
        return image_usage(body)
    if api == "openai_speech":
        return speech_usage(body)
    usage = _text_usage(api, body)
    if api == "openai_chat":
        modalities = body.get("modalities")
        if isinstance(modalities, list) and "audio" in modalities:
            return replace(
                usage,
                input_audio_tokens=usage.input_tokens // 2,
                output_audio_tokens=usage.output_tokens,
            )
    if api == "gemini":
        if _has_audio_part(body.get("contents")):
            usage = replace(usage, input_audio_tokens=usage.input_tokens // 2)
        config = body.get("generationConfig")
        modalities = config.get("responseModalities") if isinstance(config, dict) else None
        if isinstance(modalities, list) and "IMAGE" in modalities:
            usage = replace(usage, output_image_tokens=usage.output_tokens - gemini_thoughts(body))
    return usage


def _text_usage(api: Api, body: Mapping[str, Any]) -> TokenUsage:
    """The usage this provider reports for `body`.

    Input: total characters of all message text // 4 (at least 1), plus a fixed overhead.
    Output: the request's output-token limit capped at MAX_OUTPUT_TOKENS, else
    DEFAULT_OUTPUT_TOKENS; none for embeddings; plus Gemini's thought tokens
    (`gemini_thoughts`). Cache, so the cache fields can be tested without state: an
    OpenAI request with `prompt_cache_key` or a Gemini request with `cachedContent` reads
    half its input from cache; an Anthropic request (on Bedrock too) with any
    `cache_control` reads half and writes a quarter.
    """
    chars = sum(len(_text(body.get(key))) for key in _INPUT_KEYS[api])
    prompt = max(chars // 4, 1) + INPUT_OVERHEAD_TOKENS
    output = min(requested_output(api, body) or DEFAULT_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS)
    if api == "openai_embeddings":
        return TokenUsage(input_tokens=prompt)
    if api == "gemini":
        cached = prompt // 2 if body.get("cachedContent") else 0
        return TokenUsage(prompt - cached, output + gemini_thoughts(body), cached)
    if api == "bedrock_converse":
        return TokenUsage(input_tokens=prompt, output_tokens=output)
    if api in ("anthropic_messages", "bedrock_invoke"):
        if not _has_cache_control(body):
            return TokenUsage(input_tokens=prompt, output_tokens=output)
        read, write = prompt // 2, prompt // 4
        return TokenUsage(prompt - read - write, output, read, write)
    cached = prompt // 2 if body.get("prompt_cache_key") else 0
    return TokenUsage(prompt - cached, output, cache_read_tokens=cached)


def output_words(count: int) -> list[str]:
    """The generated text, one stream delta per entry; joined they form the whole text."""
    return [(" " if i else "") + _WORDS[i % len(_WORDS)] for i in range(count)]


# gpt-image-1's output tokens per image (OpenAI's image generation guide), by quality and
# size; "auto" and unnamed as high and square. Each partial image of a stream draws 100.
IMAGE_TOKENS: Mapping[str, Mapping[str, int]] = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}


def image_usage(body: Mapping[str, Any]) -> TokenUsage:
    """What an images request reports: its prompt's characters // 4 (at least 1) plus the
    overhead as text input, and each image's tokens (`IMAGE_TOKENS`) as output, all image."""
    prompt = body.get("prompt")
    text = max(len(prompt) // 4, 1) if isinstance(prompt, str) else 1
    quality = str(body.get("quality") or "high").lower()
    per_size = IMAGE_TOKENS.get(quality, IMAGE_TOKENS["high"])
    per_image = per_size.get(str(body.get("size") or "1024x1024"), per_size["1024x1024"])
    partial = body.get("partial_images")
    if body.get("stream") is True and isinstance(partial, int):
        per_image += 100 * partial
    count = body.get("n")
    output = per_image * (count if isinstance(count, int) and count > 0 else 1)
    return TokenUsage(
        input_tokens=text + INPUT_OVERHEAD_TOKENS, output_tokens=output, output_image_tokens=output
    )


def speech_usage(body: Mapping[str, Any]) -> TokenUsage:
    """What a speech request reports: its text's and instructions' characters // 4 (at
    least 1) as input, and the audio spoken as output, all audio: 1.4 tokens a character
    at speed 1 (about 1,250 audio tokens a minute, 900 characters a minute), longer when
    slower."""
    text = body.get("input")
    chars = len(text) if isinstance(text, str) else 0
    instructions = body.get("instructions")
    extra = len(instructions) // 4 if isinstance(instructions, str) else 0
    speed = body.get("speed", 1)
    pace = float(speed) if isinstance(speed, int | float) and 0.25 <= speed <= 4 else 1.0
    output = max(math.ceil(chars * 1.4 / pace), 1)
    return TokenUsage(
        input_tokens=max(chars // 4, 1) + extra, output_tokens=output, output_audio_tokens=output
    )
