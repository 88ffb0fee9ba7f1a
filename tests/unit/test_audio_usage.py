"""Audio tokens are read apart from text, wherever a provider reports them, so they are
charged at the model's audio rates (several times text: sidecar/pricing.py)."""

from __future__ import annotations

import json

from sidecar.metering.gemini import gemini_usage
from sidecar.metering.openai import chat_usage
from sidecar.metering.parse import body_usage
from sidecar.model import TokenUsage

OPENAI_USAGE = {
    "prompt_tokens": 100,
    "completion_tokens": 50,
    "prompt_tokens_details": {"cached_tokens": 20, "audio_tokens": 80},
    "completion_tokens_details": {"audio_tokens": 40, "reasoning_tokens": 0},
}
OPENAI_EXPECTED = TokenUsage(
    input_tokens=80,
    output_tokens=50,
    cache_read_tokens=20,
    input_audio_tokens=80,
    output_audio_tokens=40,
)
GEMINI_USAGE = {
    "promptTokenCount": 100,
    "candidatesTokenCount": 30,
    "cachedContentTokenCount": 40,
    "promptTokensDetails": [
        {"modality": "TEXT", "tokenCount": 30},
        {"modality": "AUDIO", "tokenCount": 70},
    ],
    "cacheTokensDetails": [{"modality": "AUDIO", "tokenCount": 25}],
    "candidatesTokensDetails": [{"modality": "AUDIO", "tokenCount": 12}],
}
GEMINI_EXPECTED = TokenUsage(
    input_tokens=60,
    output_tokens=30,
    cache_read_tokens=40,
    input_audio_tokens=45,
    cache_audio_read_tokens=25,
    output_audio_tokens=12,
)


def test_openai_chat_audio_is_read_from_a_body_and_from_a_stream() -> None:
    body = {"id": "c", "object": "chat.completion", "model": "gpt-audio-mini"}
    assert body_usage("openai_chat", {**body, "usage": OPENAI_USAGE}) == OPENAI_EXPECTED
    # A stream's last chunk carries the same usage object.
    assert chat_usage(json.loads(json.dumps(OPENAI_USAGE))) == OPENAI_EXPECTED


def test_gemini_audio_is_read_by_modality_from_a_body_and_from_a_stream() -> None:
    assert body_usage("gemini", {"usageMetadata": GEMINI_USAGE}) == GEMINI_EXPECTED
    assert gemini_usage(GEMINI_USAGE) == GEMINI_EXPECTED


def test_audio_counts_are_bounded_by_the_counts_they_are_part_of() -> None:
    # A report whose audio part exceeds its total cannot make any count larger.
    usage = chat_usage(
        {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "prompt_tokens_details": {"audio_tokens": 10_000},
            "completion_tokens_details": {"audio_tokens": 10_000},
        }
    )
    assert usage == TokenUsage(
        input_tokens=10, output_tokens=5, input_audio_tokens=10, output_audio_tokens=5
    )
    assert gemini_usage(
        {"promptTokenCount": 3, "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 9}]}
    ) == TokenUsage(input_tokens=3, input_audio_tokens=3)


def test_text_only_usage_is_unchanged() -> None:
    assert chat_usage({"prompt_tokens": 7, "completion_tokens": 2}) == TokenUsage(7, 2)
    assert gemini_usage(
        {"promptTokenCount": 7, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 7}]}
    ) == TokenUsage(input_tokens=7)
