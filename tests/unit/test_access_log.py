"""Metering records from Envoy's access log, without Envoy: what each kind of call is charged.

Entries are built as Envoy sends them: the Lua filter's `sidecar.metering` metadata (chunks
with bytes >= 0x80 as `~`, or base64 for a compressed body), the ext_authz metadata, the
response code and the upstream timings.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from structlog.testing import capture_logs

from sidecar import tracing
from sidecar.config.models import SidecarConfig
from sidecar.config.ruleset import RuleSetHolder, build_ruleset
from sidecar.engine import Engine
from sidecar.envoy.access_log import AccessLogServicer
from sidecar.metering.charge import Observed, bill
from sidecar.metering.record import _EVENT_END, TAIL_EVENTS, _from_event, _last_events
from sidecar.model import TokenUsage
from sidecar.pricing import UnitPrice
from sidecar.store.budget_types import CommitResult

CHAT = "/openai/v1/chat/completions"
END_BYTES = 4096  # sidecar/envoy/meter.lua
PRICE = UnitPrice(input=150_000, output=600_000, cache_read=0, cache_write=0, source="override")
CHAT_JSON = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}}


def charged(observed: Observed) -> int:
    """µUSD charged for `observed` when 2,000 were reserved."""
    return bill("gpt-4o-mini", PRICE, lambda _: None, 2_000, observed).total


class FakeEngine:
    def __init__(self) -> None:
        self.charges: list[tuple[str, Observed, tuple[str, str] | None]] = []
        self.batches: list[int] = []  # charges per `charge_many`
        rules = build_ruleset(
            SidecarConfig.model_validate(
                {
                    "providers": [
                        {"id": "openai", "path_prefix": "/openai/"},
                        {"id": "anthropic", "path_prefix": "/anthropic/"},
                    ]
                }
            )
        )
        self.holder = RuleSetHolder(rules)

    async def charge(
        self,
        request_id: str,
        observed: Observed,
        *,
        expect: tuple[str, str] | None = None,
        hint: tuple[str, str] | None = None,
    ) -> tuple[CommitResult, int]:
        self.charges.append((request_id, observed, hint))
        return CommitResult("committed"), 1

    async def charge_many(
        self, charges: Sequence[tuple[str, Observed, tuple[str, str] | None]]
    ) -> list[tuple[CommitResult, int] | Exception]:
        self.batches.append(len(charges))
        return [
            await self.charge(request_id, observed, hint=hint)
            for request_id, observed, hint in charges
        ]

    @property
    def usages(self) -> list[TokenUsage | None]:
        return [observed.usage for _, observed, _ in self.charges]


def entry(
    chunks: Sequence[bytes] = (),
    *,
    status: int = 200,
    path: str = CHAT,
    content_type: str = "application/json",
    encoding: str = "",
    done: bool = True,
    reached: bool = True,
    rid: str = "req-1",
    model: str = "gpt-4o-mini",
    provider: str = "openai",
    route: str = "",
    input_tokens: int = 0,
    response_started: bool = True,
) -> accesslog_pb2.HTTPAccessLogEntry:
    """An access log entry as Envoy sends it for an admitted call."""
    out = accesslog_pb2.HTTPAccessLogEntry()
    meta = out.common_properties.metadata.filter_metadata["sidecar.metering"]
    for key, value in {
        "rid": rid,
        "path": path,
        "route": route,
        "provider": provider,
        "model": model,
    }.items():
        meta.fields[key].string_value = value
    if response_started:
        meta.fields["content_type"].string_value = content_type
        meta.fields["content_encoding"].string_value = encoding
        out.response.response_code.value = status
    compressed = encoding not in ("", "identity")
    if compressed:
        meta.fields["base64"].bool_value = True
    for index, chunk in enumerate(chunks, 1):
        text = (
            base64.b64encode(chunk).decode()
            if compressed
            else bytes(b if b < 0x80 else 0x7E for b in chunk).decode()
        )
        meta.fields[f"c{index}"].string_value = text
    if chunks:
        meta.fields["chunks"].number_value = len(chunks)
        meta.fields["bytes"].number_value = sum(map(len, chunks))
    if done and response_started:
        meta.fields["done"].bool_value = True
        if not compressed:
            # As sidecar/envoy/meter.lua: the first bytes, and the last whole chunks that
            # hold at least END_BYTES.
            safe = [bytes(b if b < 0x80 else 0x7E for b in c) for c in chunks]
            last: list[bytes] = []
            while safe and sum(map(len, last)) < END_BYTES:
                last.insert(0, safe.pop())
            meta.fields["head"].string_value = b"".join(
                bytes(b if b < 0x80 else 0x7E for b in c) for c in chunks
            )[:2048].decode()
            meta.fields["end"].string_value = b"".join(last).decode()
            meta.fields["end_offset"].number_value = sum(map(len, safe))
    if reached:
        out.common_properties.time_to_last_upstream_tx_byte.nanos = 1000
    if input_tokens:
        authz = out.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"]
        authz.fields["sidecar"].struct_value.fields["input_tokens"].number_value = input_tokens
    return out


def deliver(servicer: AccessLogServicer, *entries: accesslog_pb2.HTTPAccessLogEntry) -> None:
    """`entries` in one access log message, and every charge they start done."""
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend(entries)

    async def go() -> None:
        async def messages() -> AsyncIterator[Any]:
            yield message

        await servicer.StreamAccessLogs(messages(), cast(Any, None))
        from sidecar.metering.exchange import drain_charges

        await drain_charges()

    asyncio.run(go())


def run(*entries: accesslog_pb2.HTTPAccessLogEntry, engine: FakeEngine | None = None) -> FakeEngine:
    engine = engine or FakeEngine()
    deliver(AccessLogServicer(cast(Engine, engine)), *entries)
    return engine


def test_complete_json_response_is_charged_its_usage_once() -> None:
    engine = run(entry([json.dumps(CHAT_JSON).encode()]))
    assert [(rid, o.usage, o.complete) for rid, o, _ in engine.charges] == [
        ("req-1", TokenUsage(12, 5), True)
    ]


def test_gzip_body_is_metered() -> None:
    engine = run(entry([gzip.compress(json.dumps(CHAT_JSON).encode())], encoding="gzip"))
    assert engine.usages == [TokenUsage(12, 5)]


@pytest.mark.parametrize("status", [401, 429, 500, 503])
def test_provider_error_without_usage_is_an_error(status: int) -> None:
    error = {"error": {"message": "overloaded", "type": "server_error"}}
    engine = run(entry([json.dumps(error).encode()], status=status))
    ((_, observed, _),) = engine.charges
    assert observed.usage is None and observed.status == status and observed.error
    assert charged(observed) == 0


def test_error_body_that_reports_usage_is_observed_with_that_usage() -> None:
    partial = {"error": {"message": "cut"}, "usage": {"prompt_tokens": 12, "completion_tokens": 3}}
    engine = run(entry([json.dumps(partial).encode()], status=500))
    ((_, observed, _),) = engine.charges
    assert observed.usage == TokenUsage(12, 3) and observed.error


def test_upstream_unreachable_never_reached_the_provider_and_costs_nothing() -> None:
    # Envoy's own 503 after a connect failure: nothing was sent upstream.
    engine = run(
        entry(
            [b"upstream connect error or disconnect/reset before headers"],
            status=503,
            content_type="text/plain",
            reached=False,
        )
    )
    ((_, observed, _),) = engine.charges
    assert not observed.reached_upstream and charged(observed) == 0


def test_client_gone_before_the_request_went_upstream_costs_nothing() -> None:
    engine = run(entry(response_started=False, reached=False))
    ((_, observed, _),) = engine.charges
    assert observed.status == 0 and not observed.reached_upstream
    assert charged(observed) == 0


def test_client_gone_after_the_request_went_upstream_pays_the_reservation() -> None:
    engine = run(entry(response_started=False, done=False))
    ((_, observed, _),) = engine.charges
    assert observed.reached_upstream and not observed.error
    assert charged(observed) == 2_000


def test_success_is_never_an_error() -> None:
    engine = run(entry([json.dumps(CHAT_JSON).encode()]))
    ((_, observed, _),) = engine.charges
    assert observed.status == 200 and not observed.error


def test_stream_cut_short_charges_what_was_seen() -> None:
    start = {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 30, "output_tokens": 1}},
    }
    frame = f"event: message_start\ndata: {json.dumps(start)}\n\n".encode()
    engine = run(
        entry(
            [frame],
            path="/anthropic/v1/messages",
            provider="anthropic",
            content_type="text/event-stream",
            done=False,
        )
    )
    ((_, observed, _),) = engine.charges
    assert observed.usage == TokenUsage(30, 1) and not observed.complete
    text = 'data: {"choices": [{"delta": {"content": "twelve bytés"}}]}\n\n'.encode()
    engine = run(entry([text], content_type="text/event-stream", done=False, input_tokens=40))
    ((_, observed, _),) = engine.charges
    # `é` is two bytes, sent as `~~`: the count of text bytes is the same.
    assert observed.usage is None and observed.output_bytes == 13
    assert observed.input_tokens == 40  # the seen text is priced with the prompt


def test_unmetered_api_pays_its_reservation() -> None:
    engine = run(entry([b'{"data": []}'], path="/openai/v1/embeddings"))
    assert [(rid, o) for rid, o, _ in engine.charges] == [("req-1", Observed(status=200))]


def test_entry_without_a_reservation_is_not_charged() -> None:
    bare = accesslog_pb2.HTTPAccessLogEntry()
    bare.response.response_code.value = 200
    assert run(bare, entry([b"{}"], rid="")).charges == []


def test_charge_is_keyed_by_the_reservation_id_with_the_model_only_a_hint() -> None:
    engine = run(entry([json.dumps(CHAT_JSON).encode()], model="cheap-model"))
    ((request_id, _, hint),) = engine.charges
    assert request_id == "req-1" and hint == ("cheap-model", "openai")


ANTHROPIC_STREAM = (
    b'event: message_start\ndata: {"type": "message_start", "message": {"usage": '
    b'{"input_tokens": 30, "output_tokens": 1}}}\n\n'
    b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 9}}\n\n'
)
CHAT_STREAM = (
    b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n'
    b"data: [DONE]\n\n"
)


def test_same_provider_fallback_is_metered_as_the_original_api() -> None:
    engine = run(
        entry(
            [ANTHROPIC_STREAM],
            path="/anthropic/v1/messages",
            provider="anthropic",
            route="fallback",
            content_type="text/event-stream",
        )
    )
    assert engine.usages == [TokenUsage(30, 9)]


def test_cross_provider_fallback_is_metered_as_chat_completions() -> None:
    engine = run(
        entry(
            [CHAT_STREAM],
            path="/anthropic/v1/messages",
            provider="openai",
            route="fallback",
            content_type="text/event-stream",
        )
    )
    assert engine.usages == [TokenUsage(7, 3)]


def _chat_chunk(text: str) -> bytes:
    return f"data: {json.dumps({'choices': [{'delta': {'content': text}}]})}\n\n".encode()


def test_long_finished_stream_is_read_from_its_ends_with_the_same_charge() -> None:
    # Thousands of chunks: the finished stream's usage is at its end.
    chunks = [_chat_chunk("tok ") for _ in range(2000)] + [CHAT_STREAM]
    assert sum(map(len, chunks)) > 2 * END_BYTES
    engine = run(entry(chunks, content_type="text/event-stream"))
    ((_, observed, _),) = engine.charges
    assert observed.usage == TokenUsage(7, 3) and observed.complete
    # Read from its ends only: the text in between was not counted (nor needed).
    assert observed.output_bytes < 2000 * 4


def test_long_cut_stream_counts_every_text_byte_that_passed() -> None:
    chunks = [_chat_chunk("tok ") for _ in range(2000)]
    engine = run(entry(chunks, content_type="text/event-stream", done=False))
    ((_, observed, _),) = engine.charges
    assert observed.usage is None and observed.output_bytes == 8000


def test_long_anthropic_stream_keeps_message_start_from_the_head() -> None:
    start, delta = ANTHROPIC_STREAM.split(b"\n\n", 1)
    text = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x" * 40}}
    middle = [f"event: content_block_delta\ndata: {json.dumps(text)}\n\n".encode()] * 1000
    engine = run(
        entry(
            [start + b"\n\n", *middle, delta],
            path="/anthropic/v1/messages",
            provider="anthropic",
            content_type="text/event-stream",
        )
    )
    assert engine.usages == [TokenUsage(30, 9)]


def test_finished_stream_without_usage_at_its_end_is_read_whole() -> None:
    # The usage chunk is not among the last events: the whole body is read, as for a cut one.
    chunks = [
        _chat_chunk("tok "),
        CHAT_STREAM.split(b"\n\n")[0] + b"\n\n",
        *[_chat_chunk("tok ") for _ in range(50)],
    ]
    engine = run(entry(chunks, content_type="text/event-stream"))
    ((_, observed, _),) = engine.charges
    assert observed.usage == TokenUsage(7, 3) and observed.output_bytes == 51 * 4


def test_one_unreadable_entry_does_not_lose_the_others() -> None:
    broken = entry([json.dumps(CHAT_JSON).encode()], rid="broken", encoding="gzip")
    broken.common_properties.metadata.filter_metadata["sidecar.metering"].fields[
        "c1"
    ].string_value = "not base64!"
    engine = run(broken, entry([json.dumps(CHAT_JSON).encode()]))
    # The unreadable body is charged as if nothing had been read: its reservation.
    assert [(rid, o.usage) for rid, o, _ in engine.charges] == [
        ("broken", None),
        ("req-1", TokenUsage(12, 5)),
    ]


def test_a_chunk_count_larger_than_the_record_reads_only_what_is_there() -> None:
    big = entry([json.dumps(CHAT_JSON).encode()])
    big.common_properties.metadata.filter_metadata["sidecar.metering"].fields[
        "chunks"
    ].number_value = 1e15
    assert run(big).usages == [TokenUsage(12, 5)]


def trimmed(chunks: Sequence[bytes], **kwargs: Any) -> accesslog_pb2.HTTPAccessLogEntry:
    """As sidecar/envoy/meter.lua sends a finished stream whose last events report usage:
    the body's pieces emptied, head its first event, end its last four events."""
    out = entry(chunks, content_type="text/event-stream", **kwargs)
    meta = out.common_properties.metadata.filter_metadata["sidecar.metering"]
    body = b"".join(chunks)
    events = [e + b"\n\n" for e in body.split(b"\n\n") if e]
    for key in list(meta.fields):
        if key.startswith("c") and key[1:].isdigit():
            meta.fields[key].string_value = ""
    meta.fields["trimmed"].bool_value = True
    meta.fields["head"].string_value = events[0].decode()
    meta.fields["end"].string_value = b"".join(events[-4:]).decode()
    meta.fields["end_offset"].number_value = len(body) - len(b"".join(events[-4:]))
    return out


def test_trimmed_stream_is_charged_its_usage_from_first_and_last_events() -> None:
    chunks = [_chat_chunk("tok ") for _ in range(500)] + [CHAT_STREAM]
    engine = run(trimmed(chunks))
    ((_, observed, _),) = engine.charges
    assert observed.usage == TokenUsage(7, 3) and observed.complete


def test_trimmed_anthropic_stream_keeps_message_start_from_its_first_event() -> None:
    start, delta = ANTHROPIC_STREAM.split(b"\n\n", 1)
    text = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x" * 40}}
    middle = [f"event: content_block_delta\ndata: {json.dumps(text)}\n\n".encode()] * 300
    engine = run(
        trimmed(
            [start + b"\n\n", *middle, delta], path="/anthropic/v1/messages", provider="anthropic"
        )
    )
    assert engine.usages == [TokenUsage(30, 9)]


def test_trimmed_stream_without_complete_usage_reads_its_first_and_last_events() -> None:
    # Usage-looking text that is no final report: what head and end show is read, and
    # the text in them is counted (the body between them never came).
    chunks = [_chat_chunk("tok ") for _ in range(10)]
    engine = run(trimmed(chunks))
    ((_, observed, _),) = engine.charges
    assert observed.usage is None and observed.output_bytes == 5 * 4


def test_short_trimmed_stream_is_read_exactly_once() -> None:
    # Head and end overlap: the events they share are counted once.
    chunks = [_chat_chunk("tok ") for _ in range(3)]
    engine = run(trimmed(chunks))
    ((_, observed, _),) = engine.charges
    assert observed.usage is None and observed.output_bytes == 3 * 4


def test_a_batch_of_records_is_charged_in_one_store_step() -> None:
    body = [json.dumps(CHAT_JSON).encode()]
    engine = run(
        entry(body, rid="a"), entry(body, rid=""), entry(body, rid="b"), entry(status=503, rid="c")
    )
    assert engine.batches == [3]
    assert [(rid, o.usage, o.status) for rid, o, _ in engine.charges] == [
        ("a", TokenUsage(12, 5), 200),
        ("b", TokenUsage(12, 5), 200),
        ("c", None, 503),
    ]


class FailsOne(FakeEngine):
    async def charge_many(
        self, charges: Sequence[tuple[str, Observed, tuple[str, str] | None]]
    ) -> list[tuple[CommitResult, int] | Exception]:
        answers = await super().charge_many(charges)
        return [
            ValueError("admitted for another model") if rid == "bad" else answer
            for (rid, _, _), answer in zip(charges, answers, strict=True)
        ]


def test_a_charge_that_fails_in_a_batch_is_logged_alone() -> None:
    body = [json.dumps(CHAT_JSON).encode()]
    with capture_logs() as logs:
        engine = run(
            entry(body, rid="a"), entry(body, rid="bad"), entry(body, rid="b"), engine=FailsOne()
        )
    assert engine.batches == [3]
    assert [(e["event"], e["request_id"]) for e in logs if e["log_level"] == "error"] == [
        ("commit_failed", "bad")
    ]


def test_with_tracing_each_record_is_charged_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "ENABLED", True)
    body = [json.dumps(CHAT_JSON).encode()]
    engine = run(entry(body, rid="a"), entry(body, rid="b"))
    assert engine.batches == []
    assert [rid for rid, _, _ in engine.charges] == ["a", "b"]


def test_last_events_found_from_the_end_are_those_a_search_from_the_start_finds() -> None:
    def from_the_start(data: bytes, at_boundary: bool) -> bytes:
        ends = [m.end() for m in _EVENT_END.finditer(data)]
        if len(ends) > TAIL_EVENTS:
            return data[ends[-TAIL_EVENTS - 1] :]
        return data if at_boundary else _from_event(data)

    rnd = random.Random(14)
    # Events of about a fifth of the window apart, between runs of line breaks of every
    # kind: the window's edge falls inside runs, right where the fifth-last boundary is,
    # and some windows hold too few boundaries.
    breaks = [b"\n\n", b"\n\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n\n", b"\r\n\n\r", b"\n"]
    for _ in range(4000):
        data = b"".join(
            b"x" * rnd.randint(150, 260) + rnd.choice(breaks) for _ in range(rnd.randint(1, 12))
        )
        for at_boundary in (True, False):
            assert _last_events(data, at_boundary) == from_the_start(data, at_boundary)
