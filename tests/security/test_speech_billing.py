"""Speech from OpenAI's speech API is charged what the provider reports it spoke.

gpt-4o-mini-tts bills the audio it speaks at $12 per million audio tokens, about 1,250 a
minute; its answer was not read, and the call was charged its reservation of
`default_max_output_tokens`, whatever the length of the text or the slowness of the voice.
Only the event stream (`stream_format: "sse"`) reports usage; speech answered as an audio
file is refused before the provider sees it."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack
from sidecar.pricing import (
    PriceBook,
    estimate_input_tokens,
    estimate_micros,
    requested_speech_tokens,
)
from tests.security.conftest import micros, openai_client, user
from tests.support.ledger import charged, ledger_row
from tests.support.prices import genai_micros

MODEL = "gpt-4o-mini-tts"
TEXT = "The lighthouse keeper counted the ships that passed in the night. " * 20


def body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "voice": "alloy", "input": TEXT, **extra}


@pytest.mark.parametrize("speed", [1.0, 0.25])
def test_streamed_speech_is_charged_what_it_spoke_through_envoy(
    stack: Stack, issuer: DevIssuer, speed: float
) -> None:
    email = user(f"speech-{speed}")
    client = openai_client(stack, issuer.mint(email))
    answer = client.audio.speech.create(
        model=MODEL, voice="alloy", input=TEXT, speed=speed, stream_format="sse"
    )
    assert answer.content.rstrip().endswith(b"}") and b"speech.audio.done" in answer.content
    usage = expected_usage("openai_speech", body(speed=speed))
    row = charged(stack, email)
    assert micros(row["cost_usd"]) == genai_micros(usage, MODEL, "openai"), row
    assert row["output_tokens"] == usage.output_tokens
    # Far above what the default output limit would have charged.
    assert usage.output_tokens > 1024 * (4 if speed < 1 else 1)


def test_speech_answered_as_audio_is_refused_before_the_provider_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("speech-audio")
    client = openai_client(stack, issuer.mint(email))
    stack.clear_seen()
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.audio.speech.create(model=MODEL, voice="alloy", input=TEXT)
    assert refused.value.status_code == 403
    assert "unmetered_call" in refused.value.response.text
    assert 'stream_format \\"sse\\"' in refused.value.response.text
    assert stack.seen() == []
    assert ledger_row(stack, email) is None


def test_hanging_up_before_the_usage_pays_the_reservation_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("speech-hang-up")
    client = openai_client(stack, issuer.mint(email), **{"x-fake-delay-ms": "300"})
    sent = body(stream_format="sse")
    with client.audio.speech.with_streaming_response.create(
        model=MODEL, voice="alloy", input=TEXT, stream_format="sse"
    ) as response:
        first = next(response.iter_bytes(1024))
        assert b"speech.audio.delta" in first
    row = charged(stack, email)
    price = PriceBook([], None).price("openai", MODEL)
    assert price is not None
    reserved = estimate_micros(price, estimate_input_tokens(sent), requested_speech_tokens(sent))
    assert micros(row["cost_usd"]) == reserved, row
    spoken = genai_micros(expected_usage("openai_speech", sent), MODEL, "openai")
    assert reserved >= spoken
