"""Usage metering over recorded-shape provider responses: JSON, SSE, gzip, any chunking."""

from __future__ import annotations

import gzip
import itertools
import json
import zlib
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.metering import parse
from sidecar.metering.anthropic import message_body_usage
from sidecar.metering.openai import chat_body_usage, responses_body_usage
from sidecar.metering.parse import Api, UsageMeter, api_for_path, body_usage
from sidecar.metering.sse import SSEDecoder, SSEEvent
from sidecar.model import TokenUsage

# Shapes as the providers send them; counts chosen so every field is distinguishable.
CHAT_JSON = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4.1-2025-04-14",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello!",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
}
CHAT_USAGE = TokenUsage(input_tokens=86, output_tokens=300, cache_read_tokens=1920)

RESPONSES_JSON = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "error": None,
    "incomplete_details": None,
    "model": "o4-mini-2025-04-16",
    "output": [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hi — ünïcode ✓", "annotations": []}],
        },
    ],
    "usage": {
        "input_tokens": 1500,
        "input_tokens_details": {"cached_tokens": 256},
        "output_tokens": 1200,
        "output_tokens_details": {"reasoning_tokens": 1024},
        "total_tokens": 2700,
    },
    "metadata": {},
}
RESPONSES_USAGE = TokenUsage(input_tokens=1244, output_tokens=1200, cache_read_tokens=256)

ANTHROPIC_JSON = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "Hello!"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 50,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 2000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 300,
        "service_tier": "standard",
    },
}
ANTHROPIC_USAGE = TokenUsage(50, 300, cache_read_tokens=2000, cache_write_tokens=1000)


def _data(payload: dict[str, Any] | str, event: str | None = None) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {body}\n\n"


def _chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1741569952,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_06737a9306",
        "choices": [choice],
        "usage": None,
    }


CHAT_SSE_HEAD = "".join(
    [
        _data(_chat_chunk({"role": "assistant", "content": "", "refusal": None})),
        _data(_chat_chunk({"content": "Bonjour"})),
        _data(_chat_chunk({"content": " — ça va ? 🙂"})),
        _data(_chat_chunk({}, "stop")),
    ]
)
CHAT_SSE = (
    CHAT_SSE_HEAD
    + _data({**_chat_chunk({}), "choices": [], "usage": CHAT_JSON["usage"]})
    + "data: [DONE]\n\n"
)


def _responses_event(kind: str, **fields: Any) -> str:
    return _data({"type": kind, "sequence_number": 0, **fields}, kind)


_IN_PROGRESS = {**RESPONSES_JSON, "status": "in_progress", "output": [], "usage": None}
_AT = {"item_id": "msg_1", "output_index": 1, "content_index": 0}
RESPONSES_SSE_HEAD = "".join(
    [
        _responses_event("response.created", response=_IN_PROGRESS),
        _responses_event("response.in_progress", response=_IN_PROGRESS),
        _responses_event("response.output_text.delta", **_AT, delta="Hi — ", logprobs=[]),
        _responses_event("response.output_text.delta", **_AT, delta="ünïcode ✓", logprobs=[]),
        _responses_event("response.output_text.done", **_AT, text="Hi — ünïcode ✓", logprobs=[]),
    ]
)
RESPONSES_SSE = RESPONSES_SSE_HEAD + _responses_event("response.completed", response=RESPONSES_JSON)

_START_MESSAGE = {
    **ANTHROPIC_JSON,
    "content": [],
    "stop_reason": None,
    "usage": {
        "input_tokens": 50,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 2000,
        "output_tokens": 1,
    },
}


def _text_delta(text: str) -> str:
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }
    return _data(delta, "content_block_delta")


def _message_delta(usage: dict[str, Any]) -> str:
    delta = {"stop_reason": "end_turn", "stop_sequence": None}
    return _data({"type": "message_delta", "delta": delta, "usage": usage}, "message_delta")


ANTHROPIC_SSE_HEAD = "".join(
    [
        _data({"type": "message_start", "message": _START_MESSAGE}, "message_start"),
        _data(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        ),
        _data('{"type": "ping"}', "ping"),
        _text_delta("Grüß"),
        _text_delta(" dich 日本"),
        _data({"type": "content_block_stop", "index": 0}, "content_block_stop"),
    ]
)
ANTHROPIC_SSE_TAIL = _data({"type": "message_stop"}, "message_stop")
ANTHROPIC_SSE = ANTHROPIC_SSE_HEAD + _message_delta({"output_tokens": 300}) + ANTHROPIC_SSE_TAIL

STREAMS: list[tuple[Api, str, TokenUsage]] = [
    ("openai_chat", CHAT_SSE, CHAT_USAGE),
    ("openai_responses", RESPONSES_SSE, RESPONSES_USAGE),
    ("anthropic_messages", ANTHROPIC_SSE, ANTHROPIC_USAGE),
]
BODIES: list[tuple[Api, dict[str, Any], TokenUsage]] = [
    ("openai_chat", CHAT_JSON, CHAT_USAGE),
    ("openai_responses", RESPONSES_JSON, RESPONSES_USAGE),
    ("anthropic_messages", ANTHROPIC_JSON, ANTHROPIC_USAGE),
]
SSE_TYPE = "text/event-stream; charset=utf-8"
JSON_TYPE = "application/json"


def _split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _meter(
    api: Api, chunks: Iterable[bytes], content_type: str = SSE_TYPE, encoding: str = ""
) -> UsageMeter:
    meter = UsageMeter.for_response(api, content_type, encoding)
    for chunk in chunks:
        meter.feed(chunk)
    meter.finish()
    return meter


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def _gzip_stream(text: str) -> bytes:
    # Flushed per event, as a server streaming gzip'd SSE does.
    compressor = zlib.compressobj(wbits=31)
    frames = [compressor.compress(f.encode() + b"\n\n") for f in text.split("\n\n") if f]
    frames = [f + compressor.flush(zlib.Z_SYNC_FLUSH) for f in frames]
    return b"".join(frames) + compressor.flush()


# --- SSE decoder ------------------------------------------------------------------------


def _decode(chunks: Iterable[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.close()


def test_sse_fields_comments_and_multiline_data() -> None:
    stream = (
        b": keep-alive comment\n"
        b"event: update\nid: 7\nretry: 100\ndata: first\ndata:second\ndata\n\n"
        b"data: plain\n\n"
        b"event: ignored-without-data\n\n"
        b"data: \n\n"
    )
    assert _decode([stream]) == [
        SSEEvent("update", "first\nsecond\n"),
        SSEEvent("message", "plain"),
        SSEEvent("message", ""),
    ]


def test_sse_line_endings_and_bom() -> None:
    stream = b"\xef\xbb\xbfdata: a\r\ndata: b\r\rdata: c\n\revent: e\rdata: d\r\n\r\n"
    expected = [SSEEvent("message", "a\nb"), SSEEvent("message", "c"), SSEEvent("e", "d")]
    assert _decode([stream]) == expected
    assert _decode(_bytewise(stream)) == expected


def test_sse_crlf_split_between_chunks_is_one_line_break() -> None:
    # Were the LF taken as a second, empty line, "a" would be dispatched alone.
    assert _decode([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]) == [SSEEvent("message", "a\nb")]


def test_sse_close_flushes_an_unterminated_event() -> None:
    assert _decode([b"data: done\n\ndata: cut"]) == [
        SSEEvent("message", "done"),
        SSEEvent("message", "cut"),
    ]


def test_sse_oversized_event_is_dropped_and_the_next_kept() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    big = b"data: " + b"x" * 200 + b"\n"
    events = decoder.feed(b"data: small\n" + big + b"data: more\n\n" + b"data: next\n\n")
    assert events == [SSEEvent("message", "next")]
    many_lines = b"data: 0123456789\n" * 10 + b"\n" + b"data: after\n\n"
    assert decoder.feed(many_lines) == [SSEEvent("message", "after")]


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(
        st.tuples(
            st.sampled_from(["", "event: x\n"]),
            st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=12),
            st.sampled_from(["\n", "\r\n", "\r"]),
        ),
        max_size=6,
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=40),
)
def test_sse_any_chunking_decodes_the_same(
    text: list[tuple[str, str, str]], cuts: list[int]
) -> None:
    stream = "".join(
        f"{head.replace(chr(10), eol)}data: {data}{eol}{eol}" for head, data, eol in text
    ).encode()
    assert _decode(_split(stream, cuts)) == _decode([stream])
    assert _decode([stream]) == [
        SSEEvent("x" if head else "message", data) for head, data, _ in text
    ]


# --- whole JSON bodies -------------------------------------------------------------------


@pytest.mark.parametrize(("api", "body", "expected"), BODIES)
def test_json_body(api: Api, body: dict[str, Any], expected: TokenUsage) -> None:
    raw = json.dumps(body, ensure_ascii=False).encode()
    for chunks in ([raw], _bytewise(raw)):
        meter = _meter(api, chunks, JSON_TYPE)
        assert meter.usage == expected
        assert meter.complete
        assert meter.error is None


@pytest.mark.parametrize(("api", "body", "expected"), BODIES)
def test_gzip_json_body(api: Api, body: dict[str, Any], expected: TokenUsage) -> None:
    raw = gzip.compress(json.dumps(body).encode())
    meter = _meter(api, _bytewise(raw), "application/json; charset=utf-8", "gzip")
    assert meter.usage == expected
    assert meter.complete


@settings(max_examples=200, deadline=None)
@given(
    api=st.sampled_from(["openai_chat", "openai_responses", "anthropic_messages"]),
    counts=st.tuples(*[st.integers(min_value=0, max_value=10**7)] * 4),
)
def test_genai_prices_and_own_parsers_agree(api: Api, counts: tuple[int, int, int, int]) -> None:
    fresh, output, read, write = counts
    if api == "openai_chat":
        usage: dict[str, Any] = {
            "prompt_tokens": fresh + read + write,
            "completion_tokens": output,
            "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
        }
        own = chat_body_usage
    elif api == "openai_responses":
        usage = {
            "input_tokens": fresh + read + write,
            "output_tokens": output,
            "input_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
        }
        own = responses_body_usage
    else:
        usage = {
            "input_tokens": fresh,
            "output_tokens": output,
            "cache_read_input_tokens": read,
            "cache_creation_input_tokens": write,
        }
        own = message_body_usage
    body = {"model": "some-finetune-nobody-prices", "usage": usage}
    expected = TokenUsage(fresh, output, read, write)
    assert body_usage(api, body) == expected
    assert own(body) == expected


def test_body_genai_prices_rejects_falls_back_to_lenient_parser() -> None:
    # Some compatible servers leave out completion_tokens; genai-prices requires it.
    body = {"model": "m", "usage": {"prompt_tokens": 40}}
    assert body_usage("openai_chat", body) == TokenUsage(input_tokens=40)


def test_error_body_has_no_usage() -> None:
    error = {"error": {"message": "Rate limit", "type": "requests", "code": "rate_limit_exceeded"}}
    meter = _meter("openai_chat", [json.dumps(error).encode()], JSON_TYPE)
    assert meter.usage is None
    assert not meter.complete
    assert meter.error is None


def test_malformed_and_oversized_json(monkeypatch: pytest.MonkeyPatch) -> None:
    cut = json.dumps(CHAT_JSON).encode()[:-10]
    assert _meter("openai_chat", [cut], JSON_TYPE).error == "bad_json"
    monkeypatch.setattr(parse, "MAX_JSON_BODY", 100)
    meter = _meter("openai_chat", [json.dumps(CHAT_JSON).encode()], JSON_TYPE)
    assert (meter.error, meter.usage) == ("body_too_large", None)


def test_gzip_bomb_stops_at_the_body_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parse, "MAX_JSON_BODY", 1024 * 1024)
    bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024))
    meter = _meter("openai_chat", [bomb], JSON_TYPE, "gzip")
    assert meter.error == "body_too_large"


# --- streams -----------------------------------------------------------------------------


@pytest.mark.parametrize(("api", "stream", "expected"), STREAMS)
def test_stream_whole_and_byte_by_byte(api: Api, stream: str, expected: TokenUsage) -> None:
    raw = stream.encode()
    for chunks in ([raw], _bytewise(raw), _bytewise(raw.replace(b"\n", b"\r\n"))):
        meter = _meter(api, chunks)
        assert meter.usage == expected
        assert meter.complete


@settings(max_examples=150, deadline=None)
@given(which=st.sampled_from(range(len(STREAMS))), data=st.data())
def test_stream_any_chunking(which: int, data: st.DataObject) -> None:
    api, stream, expected = STREAMS[which]
    raw = stream.encode()
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=len(raw) - 1), max_size=60))
    meter = _meter(api, _split(raw, cuts))
    assert meter.usage == expected
    assert meter.complete


@settings(max_examples=100, deadline=None)
@given(which=st.sampled_from(range(len(STREAMS))), data=st.data())
def test_gzip_stream_any_chunking(which: int, data: st.DataObject) -> None:
    api, stream, expected = STREAMS[which]
    raw = _gzip_stream(stream)
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=len(raw) - 1), max_size=60))
    meter = _meter(api, _split(raw, cuts), SSE_TYPE, "gzip")
    assert meter.usage == expected
    assert meter.complete


@pytest.mark.parametrize(("api", "stream", "expected"), STREAMS)
def test_stream_without_event_names(api: Api, stream: str, expected: TokenUsage) -> None:
    # Some proxies drop `event:` lines; the event type is also in each payload.
    bare = "".join(line + "\n" for line in stream.split("\n") if not line.startswith("event:"))
    meter = _meter(api, [bare.encode()])
    assert (meter.usage, meter.complete) == (expected, True)


def test_content_type_missing_is_sniffed() -> None:
    assert _meter("anthropic_messages", [ANTHROPIC_SSE.encode()], "").usage == ANTHROPIC_USAGE
    body = b"\n " + json.dumps(ANTHROPIC_JSON).encode()
    assert _meter("anthropic_messages", _bytewise(body), "").usage == ANTHROPIC_USAGE


def test_anthropic_message_delta_is_cumulative() -> None:
    stream = (
        ANTHROPIC_SSE_HEAD
        + _message_delta({"output_tokens": 10})
        + _message_delta({"output_tokens": 25})
        + ANTHROPIC_SSE_TAIL
    )
    usage = _meter("anthropic_messages", [stream.encode()]).usage
    assert usage == TokenUsage(50, 25, 2000, 1000)


def test_anthropic_message_delta_counts_replace_message_start() -> None:
    final = {
        "input_tokens": 60,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 3000,
        "output_tokens": 40,
    }
    stream = ANTHROPIC_SSE_HEAD + _message_delta(final) + ANTHROPIC_SSE_TAIL
    usage = _meter("anthropic_messages", [stream.encode()]).usage
    assert usage == TokenUsage(60, 40, cache_read_tokens=3000, cache_write_tokens=0)


def test_anthropic_stream_cut_short_keeps_what_it_saw() -> None:
    head = ANTHROPIC_SSE_HEAD.encode()
    meter = _meter("anthropic_messages", [head])
    assert meter.usage == TokenUsage(50, 1, 2000, 1000)
    assert not meter.complete
    # Cut in the middle of the message_delta: its counts never arrived.
    delta = _message_delta({"output_tokens": 300}).encode()
    assert _meter("anthropic_messages", [head + delta[:-20]]).usage == TokenUsage(50, 1, 2000, 1000)
    # Cut before message_stop: message_delta's counts are already final.
    cut = _meter("anthropic_messages", [head + delta])
    assert (cut.usage, cut.complete) == (ANTHROPIC_USAGE, True)
    # The final event without its blank line is still read.
    assert _meter("anthropic_messages", [head + delta.rstrip()]).usage == ANTHROPIC_USAGE


def test_openai_streams_cut_short_have_no_usage() -> None:
    heads: list[tuple[Api, str]] = [
        ("openai_chat", CHAT_SSE_HEAD),
        ("openai_responses", RESPONSES_SSE_HEAD),
    ]
    for api, head in heads:
        meter = _meter(api, [head.encode()])
        assert (meter.usage, meter.complete) == (None, False)


def test_openai_chat_stream_without_done_is_complete_on_usage_chunk() -> None:
    stream = CHAT_SSE.removesuffix("data: [DONE]\n\n")
    meter = _meter("openai_chat", [stream.encode()])
    assert (meter.usage, meter.complete) == (CHAT_USAGE, True)


def test_openai_chat_running_usage_in_every_chunk_last_wins() -> None:
    def with_usage(chunk: dict[str, Any], prompt: int, completion: int) -> str:
        return _data({**chunk, "usage": {"prompt_tokens": prompt, "completion_tokens": completion}})

    stream = (
        with_usage(_chat_chunk({"content": "a"}), 10, 1)
        + with_usage(_chat_chunk({"content": "b"}), 10, 2)
        + with_usage(_chat_chunk({}, "stop"), 10, 3)
        + "data: [DONE]\n\n"
    )
    meter = _meter("openai_chat", [stream.encode()])
    assert (meter.usage, meter.complete) == (TokenUsage(10, 3), True)


def test_responses_incomplete_is_terminal() -> None:
    incomplete = {**RESPONSES_JSON, "status": "incomplete"}
    stream = RESPONSES_SSE_HEAD + _responses_event("response.incomplete", response=incomplete)
    meter = _meter("openai_responses", [stream.encode()])
    assert (meter.usage, meter.complete) == (RESPONSES_USAGE, True)


def test_malformed_events_are_skipped() -> None:
    stream = "data: {not json\n\n" + _data('"a string"') + CHAT_SSE
    assert _meter("openai_chat", [stream.encode()]).usage == CHAT_USAGE


# --- encodings and lifecycle --------------------------------------------------------------


def test_concatenated_gzip_members() -> None:
    raw = ANTHROPIC_SSE.encode()
    two = gzip.compress(raw[:100]) + gzip.compress(raw[100:])
    for chunks in ([two], _bytewise(two)):
        assert _meter("anthropic_messages", chunks, SSE_TYPE, "gzip").usage == ANTHROPIC_USAGE


def test_deflate_and_identity_encodings() -> None:
    raw = json.dumps(CHAT_JSON).encode()
    assert _meter("openai_chat", [zlib.compress(raw)], JSON_TYPE, "deflate").usage == CHAT_USAGE
    assert _meter("openai_chat", [raw], JSON_TYPE, "identity").usage == CHAT_USAGE


def test_unsupported_and_corrupt_encodings() -> None:
    raw = json.dumps(CHAT_JSON).encode()
    meter = _meter("openai_chat", [raw], JSON_TYPE, "br")
    assert (meter.error, meter.usage) == ("unsupported_encoding", None)
    # A valid gzip header, then a deflate block of the reserved type.
    garbage = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 8
    corrupt = _meter("openai_chat", [garbage], JSON_TYPE, "gzip")
    assert (corrupt.error, corrupt.usage) == ("bad_encoding", None)


def test_corrupt_gzip_mid_stream_keeps_what_was_seen() -> None:
    good = _gzip_stream(ANTHROPIC_SSE_HEAD)
    # Events decoded from earlier chunks still count when a later chunk is corrupt.
    meter = _meter("anthropic_messages", [good[:-8], b"\xff" * 16], SSE_TYPE, "gzip")
    assert meter.error == "bad_encoding"
    assert meter.usage == TokenUsage(50, 1, 2000, 1000)


def test_feed_after_finish_is_a_bug() -> None:
    meter = _meter("openai_chat", [b"{}"], JSON_TYPE)
    with pytest.raises(RuntimeError):
        meter.feed(b"more")
    meter.finish()


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", "openai_chat"),
        ("/openai/v1/chat/completions?x=1", "openai_chat"),
        ("/openai/deployments/gpt/chat/completions", "openai_chat"),
        ("/v1/responses/", "openai_responses"),
        ("/openai/v1/responses", "openai_responses"),
        ("/anthropic/v1/messages", "anthropic_messages"),
        ("/v1/messages/count_tokens", None),
        ("/v1/threads/t1/messages", None),
        ("/v1/responses/resp_1", None),
        ("/v1/embeddings", "openai_embeddings"),
        ("/v1/files", None),
    ],
)
def test_api_for_path(path: str, api: Api | None) -> None:
    assert api_for_path(path) == api
