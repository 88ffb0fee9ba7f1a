"""OpenAI's speech API (gpt-4o-mini-tts) is metered from the usage its event stream ends with.

Unread, a speech call was charged its reservation: its text as input and 1,024 output
tokens, where the audio of one request's 4,096 characters draws about 5,700 audio tokens
at speed 1 and four times that at speed 0.25 ($12 per million): a fifth of its price, or
less. Speech answered as an audio file reports no usage at all, so it is refused unless
the operator admits unmetered calls.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from devtools.fake_provider import expected_usage
from devtools.fake_provider.openai import speech_audio, speech_frames
from sidecar.admission.estimate import requested_tokens, unlimited_call
from sidecar.metering.openai import closing_usage, speech_body_usage
from sidecar.metering.parse import UsageMeter, api_for_path
from sidecar.metering.record import observed
from sidecar.model import TokenUsage
from sidecar.policy.unmetered import unmetered_call
from sidecar.pricing import PriceBook, cost_micros, requested_speech_tokens
from tests.support.meters import end_records
from tests.support.prices import genai_micros

TEXT = "The lighthouse keeper counted the ships that passed in the night. " * 60
BODY: dict[str, Any] = {
    "model": "gpt-4o-mini-tts",
    "voice": "alloy",
    "input": TEXT,
    "stream_format": "sse",
}
USAGE = {"input_tokens": 1010, "output_tokens": 5680, "total_tokens": 6690}
WANT = TokenUsage(input_tokens=1010, output_tokens=5680, output_audio_tokens=5680)


def stream_bytes(usage: TokenUsage) -> bytes:
    return b"".join(speech_frames(usage))


def test_a_speech_stream_is_metered_from_its_last_event() -> None:
    assert api_for_path("/openai/v1/audio/speech") == "openai_speech"
    assert api_for_path("/openai/deployments/tts/audio/speech") == "openai_speech"
    body = stream_bytes(WANT)
    assert len(body) > 300_000  # the audio, base64, before the usage
    for size in (1, 1000, 65_536, len(body)):
        meter = UsageMeter.for_response("openai_speech", "text/event-stream", "")
        for start in range(0, len(body), size):
            meter.feed(body[start : start + size])
        meter.finish()
        assert meter.usage == WANT and meter.complete, size


def test_the_done_event_as_openai_documents_it_is_read() -> None:
    done = json.dumps({"type": "speech.audio.done", "usage": USAGE}).encode()
    assert closing_usage(b"data: " + done + b"\n\n", speech_body_usage) == WANT
    assert speech_body_usage({"usage": {"input_tokens": 3}}) == TokenUsage(input_tokens=3)
    assert speech_body_usage({"usage": {}}) is None
    assert speech_body_usage({"type": "speech.audio.delta"}) is None


def test_a_stream_cut_before_its_last_event_has_no_usage() -> None:
    body = stream_bytes(WANT)
    meter = UsageMeter.for_response("openai_speech", "text/event-stream", "")
    meter.feed(body[: body.rindex(b"data:")])
    meter.finish()
    assert meter.usage is None and not meter.complete


def test_an_audio_answer_has_no_usage() -> None:
    meter = UsageMeter.for_response("openai_speech", "audio/mpeg", "")
    meter.feed(speech_audio(WANT))
    meter.finish()
    assert meter.usage is None and not meter.complete


def test_the_metering_record_is_read_from_its_end() -> None:
    finished, cut_there = end_records("openai_speech", "text/event-stream", stream_bytes(WANT))
    seen, _ = observed(finished)
    assert seen.usage == WANT and seen.complete
    cut, _ = observed(cut_there)
    assert cut.usage is None and not cut.complete


def test_the_charge_is_genai_prices_price_of_the_usage() -> None:
    price = PriceBook([], None).price("openai", "gpt-4o-mini-tts")
    assert price is not None
    # $0.60 per million in, $12 per million of audio out.
    assert cost_micros(price, WANT) == genai_micros(WANT, "gpt-4o-mini-tts", "openai") == 68_766


@pytest.mark.parametrize("speed", [0.25, 0.5, 1, 2.5, 4.0])
def test_the_reservation_bounds_what_the_text_is_spoken_as(speed: float) -> None:
    body = {**BODY, "speed": speed}
    assert unlimited_call("/openai/v1/audio/speech", body) == "openai_speech"
    reserved = requested_speech_tokens(body)
    assert expected_usage("openai_speech", body).output_tokens <= reserved
    assert reserved == -(-2 * len(TEXT) * 100 // int(speed * 100))


@pytest.mark.parametrize("speed", [0, -1, 100, "fast", None, True, float("nan")])
def test_a_pace_the_provider_would_not_take_is_reserved_as_the_slowest(speed: object) -> None:
    assert requested_speech_tokens({**BODY, "speed": speed}) == 8 * len(TEXT)


def test_the_reservation_replaces_the_default_output_limit() -> None:
    class Rules:
        default_max_output_tokens = 1024

    body = {**BODY, "input": "Hello there, and welcome."}
    tokens = requested_tokens(Rules(), body, "openai_speech")  # type: ignore[arg-type]
    assert tokens[1] == 2 * len(body["input"])
    # A chat body on the speech path is not a speech call.
    assert unlimited_call("/openai/v1/audio/speech", {"model": "m", "input": "x"}) is None
    assert unlimited_call("/openai/v1/chat/completions", body) is None


@pytest.mark.parametrize(
    ("extra", "refused"),
    [
        ({"stream_format": "sse"}, False),
        ({}, True),
        ({"stream_format": "audio"}, True),
        ({"stream_format": "SSE"}, True),
        ({"stream_format": ["sse"]}, True),
    ],
)
def test_speech_answered_as_audio_is_an_unmetered_call(
    extra: dict[str, Any], refused: bool
) -> None:
    body = {"model": "gpt-4o-mini-tts", "voice": "alloy", "input": "Hi.", **extra}
    why = unmetered_call("v1/audio/speech", "POST", {}, body)
    assert (why is not None) == refused
    if refused:
        assert why is not None and 'stream_format "sse"' in why
    # Percent-encoded and in another case, the provider still routes it to speech.
    assert (unmetered_call("v1/Audio%2Fspeech", "POST", {}, body) is not None) == refused
