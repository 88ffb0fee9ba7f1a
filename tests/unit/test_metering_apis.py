"""Usage metering for Gemini, Bedrock Runtime and embeddings: recorded-shape bodies and
streams, whole, byte by byte and in any chunking."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterable
from typing import Any

import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.fake_provider.bedrock import eventstream_message
from sidecar.metering.parse import Api, UsageMeter, api_for_path, body_usage
from sidecar.model import TokenUsage

EVENTSTREAM = "application/vnd.amazon.eventstream"

# Gemini 2.5 with thinking and an explicit cache, as generateContent answers.
GEMINI_JSON = {
    "candidates": [
        {
            "content": {"parts": [{"text": "Metering has eight letters."}], "role": "model"},
            "finishReason": "STOP",
            "index": 0,
        }
    ],
    "usageMetadata": {
        "promptTokenCount": 1210,
        "candidatesTokenCount": 9,
        "totalTokenCount": 1519,
        "cachedContentTokenCount": 1024,
        "thoughtsTokenCount": 300,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1210}],
        "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 1024}],
    },
    "modelVersion": "gemini-2.5-flash",
    "responseId": "aKX0aOmyL4WZ1dkPlZ-4wQ4",
}
GEMINI_USAGE = TokenUsage(input_tokens=186, output_tokens=309, cache_read_tokens=1024)


def _gemini_chunk(text: str, candidates: int, finish: str | None = None) -> str:
    candidate: dict[str, Any] = {
        "content": {"parts": [{"text": text}], "role": "model"},
        "index": 0,
    }
    if finish:
        candidate["finishReason"] = finish
    usage = {
        "promptTokenCount": 1210,
        "candidatesTokenCount": candidates,
        "totalTokenCount": 1510 + candidates,
        "cachedContentTokenCount": 1024,
        "thoughtsTokenCount": 300,
    }
    return (
        "data: "
        + json.dumps(
            {"candidates": [candidate], "usageMetadata": usage, "modelVersion": "gemini-2.5-flash"}
        )
        + "\r\n\r\n"
    )


# `alt=sse`: every chunk repeats the running totals.
GEMINI_SSE = (
    _gemini_chunk("Metering", 3)
    + _gemini_chunk(" has eight", 6)
    + _gemini_chunk(" letters.", 9, "STOP")
)

CONVERSE_JSON = {
    "output": {"message": {"role": "assistant", "content": [{"text": "Eight letters."}]}},
    "stopReason": "end_turn",
    "usage": {
        "inputTokens": 31,
        "outputTokens": 7,
        "totalTokens": 2086,
        "cacheReadInputTokens": 1536,
        "cacheWriteInputTokens": 512,
    },
    "metrics": {"latencyMs": 512},
}
CONVERSE_USAGE = TokenUsage(
    input_tokens=31, output_tokens=7, cache_read_tokens=1536, cache_write_tokens=512
)
CONVERSE_EVENTS = [
    eventstream_message("messageStart", {"role": "assistant", "p": "abcd"}),
    eventstream_message(
        "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Eight"}, "p": "ab"}
    ),
    eventstream_message(
        "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": " letters."}, "p": "a"}
    ),
    eventstream_message("contentBlockStop", {"contentBlockIndex": 0, "p": "abc"}),
    eventstream_message("messageStop", {"stopReason": "end_turn", "p": "abcdefgh"}),
    eventstream_message(
        "metadata", {"usage": CONVERSE_JSON["usage"], "metrics": {"latencyMs": 512}, "p": "abcdef"}
    ),
]
CONVERSE_STREAM = b"".join(CONVERSE_EVENTS)

INVOKE_JSON = {
    "id": "msg_bdrk_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5-20251001",
    "content": [{"type": "text", "text": "Eight."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 22,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 5,
    },
}
INVOKE_USAGE = TokenUsage(input_tokens=22, output_tokens=5)


def _chunk_event(event: dict[str, Any]) -> bytes:
    encoded = base64.b64encode(json.dumps(event).encode()).decode()
    return eventstream_message("chunk", {"bytes": encoded, "p": "abc"})


INVOKE_EVENTS: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            **INVOKE_JSON,
            "content": [],
            "usage": {"input_tokens": 22, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Eight."}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}},
    {
        "type": "message_stop",
        "amazon-bedrock-invocationMetrics": {
            "inputTokenCount": 22,
            "outputTokenCount": 5,
            "invocationLatency": 300,
            "firstByteLatency": 90,
        },
    },
]
INVOKE_STREAM = b"".join(_chunk_event(e) for e in INVOKE_EVENTS)

EMBEDDINGS_JSON = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}


def _meter(api: Api, chunks: Iterable[bytes], content_type: str) -> UsageMeter:
    meter = UsageMeter.for_response(api, content_type, "")
    for chunk in chunks:
        meter.feed(chunk)
    meter.finish()
    return meter


def _split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/gemini/v1beta/models/gemini-2.5-flash:generateContent", "gemini"),
        ("/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", "gemini"),
        ("/bedrock/model/amazon.nova-pro-v1%3A0/converse", "bedrock_converse"),
        ("/bedrock/model/amazon.nova-pro-v1%3A0/converse-stream", "bedrock_converse"),
        ("/bedrock/model/anthropic.claude-haiku-4-5-20251001-v1%3A0/invoke", "bedrock_invoke"),
        ("/bedrock/model/x/invoke-with-response-stream", "bedrock_invoke"),
        ("/openai/v1/embeddings", "openai_embeddings"),
        ("/azure/openai/deployments/emb/embeddings?api-version=2024-10-21", "openai_embeddings"),
        ("/azure/openai/deployments/chat/chat/completions?api-version=2024-10-21", "openai_chat"),
        # Read as the provider routes it: percent-decoded (tests/security/test_encoded_paths.py).
        ("/openai/v1/chat%2Fcompletions", "openai_chat"),
        ("/openai/v1/chat%2fcompletions", "openai_chat"),
        ("/openai/v1/chat/completion%73", "openai_chat"),
        ("/anthropic/v1%2Fmessages", "anthropic_messages"),
        ("/gemini/v1beta/models/gemini-2.5-flash%3AgenerateContent", "gemini"),
        ("/gemini/v1beta/models/gemini-2.5-flash%3astreamGenerateContent?alt=sse", "gemini"),
        (
            "/bedrock/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ap%2Fus.x/converse",
            "bedrock_converse",
        ),
        ("/bedrock/model/x%2Finvoke", "bedrock_invoke"),
    ],
)
def test_api_for_path(path: str, api: Api) -> None:
    assert api_for_path(path) == api


@pytest.mark.parametrize(
    "path",
    [
        "/bedrock/models/x/converse",
        "/gemini/v1beta/models",
        "/bedrock/converse",
        # Decoded once, as a provider does: a doubly encoded slash or an encoded `?` is
        # part of the last segment, which no API's path ends with.
        "/openai/v1/chat%252Fcompletions",
        "/openai/v1/chat/completions%3Fx=1",
    ],
)
def test_paths_that_are_not_metered_apis(path: str) -> None:
    assert api_for_path(path) is None


@pytest.mark.parametrize(
    ("api", "body", "expected"),
    [
        ("gemini", GEMINI_JSON, GEMINI_USAGE),
        ("bedrock_converse", CONVERSE_JSON, CONVERSE_USAGE),
        ("bedrock_invoke", INVOKE_JSON, INVOKE_USAGE),
        ("openai_embeddings", EMBEDDINGS_JSON, TokenUsage(input_tokens=8)),
    ],
)
def test_json_bodies_whole_and_byte_by_byte(
    api: Api, body: dict[str, Any], expected: TokenUsage
) -> None:
    data = json.dumps(body).encode()
    assert body_usage(api, body) == expected
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        meter = _meter(api, chunks, "application/json")
        assert meter.usage == expected and meter.complete


def test_gemini_stream_without_alt_sse_is_a_json_array() -> None:
    chunks = [json.loads(line[6:]) for line in GEMINI_SSE.split("\r\n\r\n") if line]
    meter = _meter("gemini", [json.dumps(chunks).encode()], "application/json")
    assert meter.usage == GEMINI_USAGE


STREAMS: list[tuple[Api, bytes, str, TokenUsage, int]] = [
    (
        "gemini",
        GEMINI_SSE.encode(),
        "text/event-stream",
        GEMINI_USAGE,
        len("Metering has eight letters."),
    ),
    ("bedrock_converse", CONVERSE_STREAM, EVENTSTREAM, CONVERSE_USAGE, len("Eight letters.")),
    ("bedrock_invoke", INVOKE_STREAM, EVENTSTREAM, INVOKE_USAGE, len("Eight.")),
]


@pytest.mark.parametrize(("api", "data", "media", "expected", "text_bytes"), STREAMS)
def test_streams_whole_and_byte_by_byte(
    api: Api, data: bytes, media: str, expected: TokenUsage, text_bytes: int
) -> None:
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        meter = _meter(api, chunks, media)
        assert (meter.usage, meter.complete, meter.error) == (expected, True, None)
        assert meter.output_bytes == text_bytes


@settings(max_examples=60, deadline=None)
@given(which=st.integers(0, len(STREAMS) - 1), data=st.data())
def test_streams_any_chunking(which: int, data: st.DataObject) -> None:
    api, raw, media, expected, _ = STREAMS[which]
    cuts = data.draw(st.lists(st.integers(1, len(raw) - 1), max_size=40))
    meter = _meter(api, _split(raw, cuts), media)
    assert (meter.usage, meter.complete) == (expected, True)


def test_gemini_usage_is_cumulative_and_a_stream_cut_short_keeps_the_last_seen() -> None:
    first_two = GEMINI_SSE.split("\r\n\r\n")[:2]
    meter = _meter("gemini", ["\r\n\r\n".join(first_two).encode()], "text/event-stream")
    assert meter.usage == TokenUsage(input_tokens=186, output_tokens=306, cache_read_tokens=1024)
    assert not meter.complete


def test_converse_stream_cut_before_metadata_has_no_usage_but_counts_text() -> None:
    # Inside the last message, the `metadata` event.
    cut = len(CONVERSE_STREAM) - len(CONVERSE_EVENTS[-1]) // 2
    meter = _meter("bedrock_converse", [CONVERSE_STREAM[:cut]], EVENTSTREAM)
    assert meter.usage is None and not meter.complete
    assert meter.output_bytes == len("Eight letters.")


def test_corrupt_eventstream_crc_stops_metering_and_keeps_what_was_seen() -> None:
    first = eventstream_message("contentBlockDelta", {"delta": {"text": "Eight"}})
    last = bytearray(eventstream_message("metadata", {"usage": CONVERSE_JSON["usage"]}))
    last[-1] ^= 0xFF
    meter = _meter("bedrock_converse", [first, bytes(last)], EVENTSTREAM)
    assert meter.usage is None and meter.error == "bad_framing" and meter.output_bytes == 5


def test_fake_eventstream_messages_are_read_back_by_botocore() -> None:
    buffer = EventStreamBuffer()
    buffer.add_data(eventstream_message("metadata", {"usage": {"inputTokens": 3}}))
    (message,) = list(buffer)
    assert message.headers[":event-type"] == "metadata"
    assert json.loads(message.payload) == {"usage": {"inputTokens": 3}}
