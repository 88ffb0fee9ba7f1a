"""Audio, images and video are billed at the model's own rates for them: gpt-audio-mini bills
audio input at $10 per million tokens against $0.60 for text, and audio output at $20
against $2.40; gemini-2.5-flash-image bills the images it draws at $30 against $2.50.
Charged as text, a caller would spend many times what every budget counts."""

from __future__ import annotations

from typing import Any

import httpx
from openai.types.chat import ChatCompletionMessageParam

from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack
from sidecar.model import TokenUsage
from tests.security.conftest import openai_client, user
from tests.support.ledger import charged
from tests.support.prices import genai_micros

MODEL = "gpt-audio-mini"
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Read this sentence aloud, slowly and clearly, twice over."}
]


def reference_micros(usage: TokenUsage, model: str = MODEL, provider: str = "openai") -> int:
    return genai_micros(usage, model, provider)


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": PROMPT, "max_tokens": 40, **extra}


def test_audio_is_charged_at_audio_rates_json_and_streamed_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    modalities: Any = ["text", "audio"]
    audio: Any = {"voice": "alloy", "format": "wav"}
    usage = expected_usage("openai_chat", _body(modalities=modalities))
    assert usage.input_audio_tokens and usage.output_audio_tokens == usage.output_tokens
    want = reference_micros(usage)
    as_text = reference_micros(TokenUsage(usage.input_tokens, usage.output_tokens))
    assert want > 5 * as_text  # what the budgets missed before audio had its own rates

    for stream in (False, True):
        email = user("audio-stream" if stream else "audio-json")
        client = openai_client(stack, issuer.mint(email))
        if stream:
            chunks = client.chat.completions.create(
                model=MODEL,
                messages=PROMPT,
                max_tokens=40,
                modalities=modalities,
                audio=audio,
                stream=True,
            )
            assert any(c.choices for c in chunks)
        else:
            answer = client.chat.completions.create(
                model=MODEL, messages=PROMPT, max_tokens=40, modalities=modalities, audio=audio
            )
            assert answer.usage is not None
            details = answer.usage.completion_tokens_details
            assert details is not None and details.audio_tokens == usage.output_audio_tokens
        row = charged(stack, email)
        assert round(row["cost_usd"] * 1_000_000) == want, (stream, row)


def test_text_only_calls_to_an_audio_model_are_charged_as_text_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("audio-text")
    client = openai_client(stack, issuer.mint(email))
    client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=40)
    usage = expected_usage("openai_chat", _body())
    assert not usage.input_audio_tokens
    assert round(charged(stack, email)["cost_usd"] * 1_000_000) == reference_micros(usage)


def test_gemini_images_are_charged_at_image_rates_json_and_streamed_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    model = "gemini-2.5-flash-image"
    body = {
        "contents": [{"role": "user", "parts": [{"text": "Draw a lighthouse at dusk."}]}],
        "generationConfig": {"responseModalities": ["TEXT", "IMAGE"], "maxOutputTokens": 60},
    }
    usage = expected_usage("gemini", body)
    assert usage.output_image_tokens == usage.output_tokens
    want = reference_micros(usage, model, "google")
    assert want > 5 * reference_micros(
        TokenUsage(usage.input_tokens, usage.output_tokens), model, "google"
    )
    base = f"{stack.envoy_url}/gemini/v1beta/models/{model}"
    for method in ("generateContent", "streamGenerateContent?alt=sse"):
        email = user("image-stream" if "stream" in method else "image-json")
        headers = {"authorization": f"Bearer {issuer.mint(email)}"}
        response = httpx.post(f"{base}:{method}", json=body, headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        row = charged(stack, email)
        assert round(row["cost_usd"] * 1_000_000) == want, (method, row)
