"""ext_proc without Envoy: request-body changes, and what each kind of exchange is charged."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, cast

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from sidecar.config.models import SidecarConfig
from sidecar.config.ruleset import RuleSetHolder, build_ruleset
from sidecar.engine import Engine
from sidecar.envoy.ext_proc import ExternalProcessorServicer
from sidecar.envoy.request_body import Mutation, mutate
from sidecar.metering.charge import Observed
from sidecar.metering.parse import Api
from sidecar.model import TokenUsage
from sidecar.store.budget_types import CommitResult

CHAT = "/openai/v1/chat/completions"


# --- request bodies ----------------------------------------------------------------------


def test_openai_chat_stream_gets_include_usage_and_its_event_is_stripped() -> None:
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": []}).encode()
    change = mutate(body, "openai_chat", None)
    assert change.body is not None and change.strip_usage_event
    assert json.loads(change.body)["stream_options"] == {"include_usage": True}


def test_include_usage_false_cannot_switch_metering_off() -> None:
    body = json.dumps({"stream": True, "stream_options": {"include_usage": False}}).encode()
    change = mutate(body, "openai_chat", None)
    assert change.body is not None and change.strip_usage_event
    assert json.loads(change.body)["stream_options"] == {"include_usage": True}


def test_existing_stream_options_are_kept() -> None:
    body = json.dumps({"stream": True, "stream_options": {"x": 1}}).encode()
    out = mutate(body, "openai_chat", None).body
    assert out is not None and json.loads(out)["stream_options"] == {"x": 1, "include_usage": True}


def test_bodies_that_need_nothing_are_not_touched() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"stream": True, "stream_options": {"include_usage": True}}, "openai_chat"),
        ({"stream": False}, "openai_chat"),
        ({"messages": []}, "openai_chat"),
        ({"stream": True}, "anthropic_messages"),  # Anthropic always reports usage
        ({"stream": True}, "openai_responses"),
    ]
    for data, api in cases:
        assert mutate(json.dumps(data).encode(), cast(Api, api), None) == Mutation(), data
    assert mutate(b"{not json", "openai_chat", "m") == Mutation()
    assert mutate(b"[1]", "openai_chat", "m") == Mutation()


def test_fallback_rewrites_model_and_requests_usage_in_one_pass() -> None:
    body = '{"model":"claude-opus-4-7","stream":true,"messages":[{"content":"héllo"}]}'.encode()
    out = mutate(body, "openai_chat", "claude-haiku-4-5").body
    assert out is not None
    data = json.loads(out)
    assert data["model"] == "claude-haiku-4-5" and data["stream_options"]["include_usage"]
    assert "héllo".encode() in out  # not \\u-escaped: the body does not grow needlessly


# --- exchanges -----------------------------------------------------------------------------


class FakeEngine:
    def __init__(self) -> None:
        self.charges: list[tuple[str, Observed, tuple[str, str] | None]] = []
        rules = build_ruleset(SidecarConfig.model_validate({"providers": [
            {"id": "openai", "path_prefix": "/openai/"},
            {"id": "anthropic", "path_prefix": "/anthropic/"}]}))
        self.holder = RuleSetHolder(rules)

    async def charge(self, request_id: str, observed: Observed, *,
                     expect: tuple[str, str] | None = None,
                     hint: tuple[str, str] | None = None) -> tuple[CommitResult, int]:
        self.charges.append((request_id, observed, hint))
        return CommitResult("committed"), 1

    @property
    def usages(self) -> list[TokenUsage | None]:
        return [observed.usage for _, observed, _ in self.charges]


def _header_map(headers: Mapping[str, str]) -> base_pb2.HeaderMap:
    # Envoy 1.40 sends values only in raw_value.
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                       for k, v in headers.items()])


def request_headers(path: str = CHAT, model: str = "gpt-4o-mini", **extra: str) -> Any:
    headers = {":path": path, ":method": "POST", "x-request-id": "envoy-1",
               "x-sidecar-request-id": "req-1" if model else "",
               "x-sidecar-model": model, "x-sidecar-provider": "openai", **extra}
    headers = {k: v for k, v in headers.items() if v}
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_header_map(headers)))


def request_body(data: Mapping[str, Any]) -> Any:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=json.dumps(data).encode(),
                                                         end_of_stream=True))


def response_headers(status: str = "200", content_type: str = "application/json",
                     **extra: str) -> Any:
    headers = {":status": status, "content-type": content_type, **extra}
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=_header_map(headers)))


def response_body(data: bytes, end: bool = True) -> Any:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end))


async def _iterate(messages: Iterable[Any]) -> AsyncIterator[Any]:
    for message in messages:
        yield message


class Writes:
    """Stands in for the gRPC stream context: collects what the servicer writes."""

    def __init__(self) -> None:
        self.responses: list[Any] = []

    async def write(self, response: Any) -> None:
        self.responses.append(response)


def run(messages: list[Any]) -> tuple[FakeEngine, list[Any]]:
    engine = FakeEngine()
    servicer = ExternalProcessorServicer(cast(Engine, engine))
    context = Writes()
    asyncio.run(servicer.Process(_iterate(messages), cast(Any, context)))
    return engine, context.responses


CHAT_JSON = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}}
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def test_complete_json_response_commits_its_usage_once() -> None:
    engine, _ = run([request_headers(), request_body(BODY), response_headers(),
                     response_body(json.dumps(CHAT_JSON).encode())])
    assert [(rid, o.usage, o.complete) for rid, o, _ in engine.charges] == [
        ("req-1", TokenUsage(12, 5), True)]


def test_gzip_body_is_metered() -> None:
    engine, _ = run([request_headers(), request_body(BODY),
                     response_headers(**{"content-encoding": "gzip"}),
                     response_body(gzip.compress(json.dumps(CHAT_JSON).encode()))])
    assert engine.usages == [TokenUsage(12, 5)]


@pytest.mark.parametrize("status", ["401", "429", "500", "503"])
def test_provider_error_without_usage_is_charged_as_an_error_now(status: str) -> None:
    error = {"error": {"message": "overloaded", "type": "server_error"}}
    engine, _ = run([request_headers(), request_body(BODY), response_headers(status),
                     response_body(json.dumps(error).encode())])
    ((_, observed, _),) = engine.charges
    assert observed.usage is None and observed.status == int(status) and observed.error


def test_error_body_that_reports_usage_is_observed_with_that_usage() -> None:
    partial = {"error": {"message": "cut"}, "usage": {"prompt_tokens": 12,
                                                      "completion_tokens": 3}}
    engine, _ = run([request_headers(), request_body(BODY), response_headers("500"),
                     response_body(json.dumps(partial).encode())])
    ((_, observed, _),) = engine.charges
    assert observed.usage == TokenUsage(12, 3) and observed.error


def test_envoy_local_reply_after_admission_is_an_error() -> None:
    # Upstream unreachable: Envoy answers 503 itself, plain text, after the request phases.
    engine, _ = run([request_headers(), request_body(BODY),
                     response_headers("503", content_type="text/plain"),
                     response_body(b"upstream connect error or disconnect/reset before headers")])
    ((_, observed, _),) = engine.charges
    assert observed.usage is None and observed.status == 503


def test_success_is_never_an_error() -> None:
    engine, _ = run([request_headers(), request_body(BODY), response_headers(),
                     response_body(json.dumps(CHAT_JSON).encode())])
    ((_, observed, _),) = engine.charges
    assert observed.status == 200 and not observed.error


def test_stream_cut_short_charges_what_was_seen() -> None:
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 30,
                                                            "output_tokens": 1}}}
    frame = f"event: message_start\ndata: {json.dumps(start)}\n\n".encode()
    engine, _ = run([request_headers("/anthropic/v1/messages", "claude-haiku-4-5"),
                     request_body(BODY), response_headers(content_type="text/event-stream"),
                     response_body(frame, end=False)])  # and then the stream ends
    ((_, observed, _),) = engine.charges
    assert observed.usage == TokenUsage(30, 1) and not observed.complete
    text = b'data: {"choices": [{"delta": {"content": "twelve bytes"}}]}\n\n'
    engine, _ = run([request_headers(), request_body({**BODY, "stream": True}),
                     response_headers(content_type="text/event-stream"),
                     response_body(text, end=False)])
    ((_, observed, _),) = engine.charges
    assert observed.usage is None and observed.output_bytes == 12
    assert observed.input_tokens > 0  # the seen text is priced with the prompt


def test_local_reply_without_request_phases_is_not_metered() -> None:
    engine, responses = run([response_headers("429"), response_body(b'{"success":false}')])
    assert engine.charges == []
    # The override switches the response body to NONE (the enum's zero): not sent to us.
    assert responses[0].HasField("mode_override")


def test_unmetered_api_pays_its_reservation_at_response_headers() -> None:
    engine, _ = run([request_headers("/openai/v1/embeddings", "text-embedding-3-small"),
                     request_body({"model": "text-embedding-3-small", "input": "x"}),
                     response_headers()])
    assert [(rid, o) for rid, o, _ in engine.charges] == [("req-1", Observed(status=200))]


def test_unadmitted_request_is_left_alone() -> None:
    engine, responses = run([request_headers(model=""), request_body({**BODY, "stream": True}),
                             response_headers(), response_body(b"{}")])
    assert engine.charges == []
    assert not responses[1].request_body.HasField("response")


def test_stream_request_body_is_rewritten_with_a_new_length() -> None:
    _, responses = run([request_headers(), request_body({**BODY, "stream": True})])
    common = responses[1].request_body.response
    new_body = common.body_mutation.body
    assert json.loads(new_body)["stream_options"] == {"include_usage": True}
    length, encoding = common.header_mutation.set_headers
    assert length.header.key == "content-length"
    assert length.header.raw_value == str(len(new_body)).encode()
    # The injected usage event is taken out of the response, which needs it uncompressed.
    assert (encoding.header.key, encoding.header.raw_value) == ("accept-encoding", b"identity")


ANTHROPIC_STREAM = (
    b'event: message_start\ndata: {"type": "message_start", "message": {"usage": '
    b'{"input_tokens": 30, "output_tokens": 1}}}\n\n'
    b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 9}}\n\n'
)
CHAT_STREAM = (b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n'
               b"data: [DONE]\n\n")


def test_same_provider_fallback_is_metered_as_the_original_api() -> None:
    engine, _ = run([request_headers("/anthropic/v1/messages", "claude-haiku-4-5",
                                     **{"x-sidecar-route": "fallback",
                                        "x-sidecar-provider": "anthropic"}),
                     request_body(BODY), response_headers(content_type="text/event-stream"),
                     response_body(ANTHROPIC_STREAM)])
    assert engine.usages == [TokenUsage(30, 9)]


def test_cross_provider_fallback_is_metered_as_chat_completions() -> None:
    engine, responses = run([
        request_headers("/anthropic/v1/messages", "gpt-4o-mini",
                        **{"x-sidecar-route": "fallback", "x-sidecar-provider": "openai"}),
        request_body({**BODY, "model": "claude-opus-4-7", "stream": True}),
        response_headers(content_type="text/event-stream"), response_body(CHAT_STREAM)])
    assert engine.usages == [TokenUsage(7, 3)]
    sent = json.loads(responses[1].request_body.response.body_mutation.body)
    assert sent["model"] == "gpt-4o-mini" and sent["stream_options"] == {"include_usage": True}
    # The client did not ask for usage: the usage event is taken out of what it receives.
    assert responses[3].response_body.response.body_mutation.body == b"data: [DONE]\n\n"


def test_client_that_asked_for_usage_keeps_its_usage_event() -> None:
    wanted = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    engine, responses = run([request_headers(), request_body(wanted),
                             response_headers(content_type="text/event-stream"),
                             response_body(CHAT_STREAM)])
    assert engine.usages == [TokenUsage(7, 3)]
    assert not responses[3].response_body.HasField("response")


def test_charge_is_keyed_by_the_reservation_id_with_the_model_only_a_hint() -> None:
    # Whatever x-sidecar-model a stream claims, the engine prices the charge from the
    # reservation record (tests/security); the header is only the store-down pricing hint.
    engine, _ = run([request_headers(model="cheap-model"), request_body(BODY),
                     response_headers(), response_body(json.dumps(CHAT_JSON).encode())])
    ((request_id, _, hint),) = engine.charges
    assert request_id == "req-1" and hint == ("cheap-model", "openai")
