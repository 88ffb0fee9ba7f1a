"""ext_proc without Envoy: the request-body changes, and that it never charges anything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, cast

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from sidecar.config.models import SidecarConfig
from sidecar.config.ruleset import RuleSetHolder, build_ruleset
from sidecar.engine import Engine
from sidecar.envoy.attach import lua_source
from sidecar.envoy.ext_proc import ExternalProcessorServicer
from sidecar.metering.charge import Observed
from sidecar.metering.parse import Api
from sidecar.metering.request_body import (
    USAGE_OPTION_MEMBER,
    Mutation,
    body_action,
    insert_usage_option,
    mutate,
)
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


# --- the servicer --------------------------------------------------------------------------


class FakeEngine:
    def __init__(self) -> None:
        self.charges: list[tuple[str, Observed]] = []
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

    async def charge(self, request_id: str, observed: Observed, **_: Any) -> CommitResult:
        self.charges.append((request_id, observed))
        return CommitResult("committed")


def _header_map(headers: Mapping[str, str]) -> base_pb2.HeaderMap:
    # Envoy 1.40 sends values only in raw_value.
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    )


def request_headers(path: str = CHAT, model: str = "gpt-4o-mini", **extra: str) -> Any:
    headers = {
        ":path": path,
        ":method": "POST",
        "x-request-id": "envoy-1",
        "x-sidecar-model": model,
        "x-sidecar-provider": "openai",
        **extra,
    }
    headers = {k: v for k, v in headers.items() if v}
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_header_map(headers)))


def request_body(data: Mapping[str, Any]) -> Any:
    return pb.ProcessingRequest(
        request_body=pb.HttpBody(body=json.dumps(data).encode(), end_of_stream=True)
    )


def response_phases() -> list[Any]:
    headers = _header_map({":status": "200", "content-type": "application/json"})
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    return [
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=headers)),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=usage.encode(), end_of_stream=True)),
    ]


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


BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _strip_flag(response: Any) -> bool:
    fields = response.dynamic_metadata.fields
    return (
        "sidecar.body" in fields
        and fields["sidecar.body"].struct_value.fields["strip_usage"].bool_value
    )


def test_stream_request_body_is_rewritten_with_a_new_length_and_the_strip_flag() -> None:
    _, responses = run([request_headers(), request_body({**BODY, "stream": True})])
    common = responses[1].request_body.response
    new_body = common.body_mutation.body
    assert json.loads(new_body)["stream_options"] == {"include_usage": True}
    (length,) = common.header_mutation.set_headers
    assert length.header.key == "content-length"
    assert length.header.raw_value == str(len(new_body)).encode()
    # The client did not ask for usage: the Lua filter takes the event out of its stream.
    assert _strip_flag(responses[1])


def test_client_that_asked_for_usage_gets_no_strip_flag() -> None:
    wanted = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    _, responses = run([request_headers(), request_body(wanted)])
    assert not responses[1].request_body.HasField("response")
    assert not _strip_flag(responses[1])


def test_cross_provider_fallback_rewrites_the_model_for_chat_completions() -> None:
    _, responses = run(
        [
            request_headers(
                "/anthropic/v1/messages",
                "gpt-4o-mini",
                **{"x-sidecar-route": "fallback", "x-sidecar-provider": "openai"},
            ),
            request_body({**BODY, "model": "claude-opus-4-7", "stream": True}),
        ]
    )
    sent = json.loads(responses[1].request_body.response.body_mutation.body)
    assert sent["model"] == "gpt-4o-mini" and sent["stream_options"] == {"include_usage": True}
    assert _strip_flag(responses[1])


def test_same_provider_fallback_keeps_the_anthropic_body_shape() -> None:
    _, responses = run(
        [
            request_headers(
                "/anthropic/v1/messages",
                "claude-haiku-4-5",
                **{"x-sidecar-route": "fallback", "x-sidecar-provider": "anthropic"},
            ),
            request_body({**BODY, "model": "claude-opus-4-7", "stream": True}),
        ]
    )
    sent = json.loads(responses[1].request_body.response.body_mutation.body)
    # Anthropic reports usage by itself: only the model changes, nothing is stripped.
    assert sent["model"] == "claude-haiku-4-5" and "stream_options" not in sent
    assert not _strip_flag(responses[1])


def test_unadmitted_request_is_left_alone() -> None:
    _, responses = run([request_headers(model=""), request_body({**BODY, "stream": True})])
    assert not responses[1].request_body.HasField("response")
    assert not _strip_flag(responses[1])


def test_ext_proc_never_charges_even_when_sent_a_whole_exchange() -> None:
    # Responses are metered by the Lua filter and the access log; a stream here, Envoy's or
    # anyone's, moves no charge.
    engine, responses = run([request_headers(), request_body(BODY), *response_phases()])
    assert engine.charges == []
    assert [r.WhichOneof("response") for r in responses] == [
        "request_headers",
        "request_body",
        "response_headers",
        "response_body",
    ]


# --- who changes the body: nobody, the Lua filter, or ext_proc ------------------------------


@pytest.mark.parametrize(
    ("body", "api", "model", "action"),
    [
        (
            {"model": "m", "stream": True, "messages": []},
            "openai_chat",
            None,
            "insert_usage_option",
        ),
        (
            {"model": "m", "stream": True, "stream_options": {"include_usage": False}},
            "openai_chat",
            None,
            "ext_proc",
        ),
        (
            {"model": "m", "stream": True, "stream_options": {"include_usage": True}},
            "openai_chat",
            None,
            "",
        ),
        ({"model": "m", "stream": False}, "openai_chat", None, ""),
        ({"model": "m", "stream": True}, "anthropic_messages", None, ""),
        ({"model": "m", "stream": True}, "openai_responses", None, ""),
        ({"model": "m"}, "anthropic_messages", "fallback-model", "ext_proc"),
    ],
)
def test_body_action_agrees_with_mutate(
    body: dict[str, Any], api: Api, model: str | None, action: str
) -> None:
    raw = json.dumps(body).encode()
    assert body_action(raw, api, model) == action
    change = mutate(raw, api, model)
    assert (change.body is not None) == (action != "")
    if action == "insert_usage_option":
        # The Lua filter's insertion gives the document ext_proc would have sent.
        assert change.body is not None
        assert json.loads(insert_usage_option(raw)) == json.loads(change.body)


def test_lua_filter_inserts_the_same_member() -> None:
    assert USAGE_OPTION_MEMBER.decode() in lua_source()
