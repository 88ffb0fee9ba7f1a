"""The fake provider speaks each API well enough for the official SDKs, with usage as documented."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import uvicorn
from starlette.testclient import TestClient

from devtools import harness_env
from devtools.fake_provider import (
    DEFAULT_OUTPUT_TOKENS,
    MAX_OUTPUT_TOKENS,
    create_app,
    expected_usage,
    output_words,
)
from sidecar.metering.parse import Api, UsageMeter, body_usage
from sidecar.model import TokenUsage

CLAUDE = "claude-haiku-4-5"
GPT = "gpt-4o-mini"


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    sock = _free_socket()
    server = uvicorn.Server(uvicorn.Config(create_app(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake provider did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def oai(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/openai/v1", api_key="test", max_retries=0) as c:
        yield c


@pytest.fixture
def claude(base_url: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=f"{base_url}/anthropic", api_key="test", max_retries=0) as c:
        yield c


def _chat_usage(usage: Any) -> TokenUsage:
    cached = usage.prompt_tokens_details.cached_tokens or 0
    return TokenUsage(usage.prompt_tokens - cached, usage.completion_tokens, cached)


def _responses_usage(usage: Any) -> TokenUsage:
    cached = usage.input_tokens_details.cached_tokens or 0
    return TokenUsage(usage.input_tokens - cached, usage.output_tokens, cached)


def _anthropic_usage(usage: Any) -> TokenUsage:
    return TokenUsage(
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens or 0,
        usage.cache_creation_input_tokens or 0,
    )


LONG = "the quick brown fox jumps over the lazy dog " * 40


def test_expected_usage_formula() -> None:
    body: dict[str, Any] = {"model": GPT, "messages": [{"role": "user", "content": "x" * 40}]}
    assert expected_usage("openai_chat", body) == TokenUsage(10 + 8, DEFAULT_OUTPUT_TOKENS)
    body["max_tokens"] = 10_000
    assert expected_usage("openai_chat", body).output_tokens == MAX_OUTPUT_TOKENS
    empty = {"model": CLAUDE, "messages": []}
    assert expected_usage("anthropic_messages", empty).input_tokens == 1 + 8
    assert "".join(output_words(3)) == "alpha bravo charlie"


def test_chat_completion(oai: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": LONG}]},
    ]
    reply = oai.chat.completions.create(model=GPT, messages=messages, max_completion_tokens=7)
    body = {"messages": messages, "max_completion_tokens": 7}
    assert reply.model == GPT
    assert reply.choices[0].message.content == "".join(output_words(7))
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert _chat_usage(reply.usage) == expected_usage("openai_chat", body)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7


def test_chat_completion_cached_tokens_agree_with_metering(oai: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": LONG}]
    reply = oai.chat.completions.create(model=GPT, messages=messages, prompt_cache_key="k1")
    expected = expected_usage("openai_chat", {"messages": messages, "prompt_cache_key": "k1"})
    assert expected.cache_read_tokens > 0
    assert reply.usage is not None
    assert _chat_usage(reply.usage) == expected
    assert body_usage("openai_chat", reply.model_dump()) == expected


def test_chat_stream_with_usage(oai: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "count to five"}]
    stream = oai.chat.completions.create(
        model=GPT,
        messages=messages,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert deltas == output_words(5)
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    expected = expected_usage("openai_chat", {"messages": messages, "max_tokens": 5})
    assert _chat_usage(chunks[-1].usage) == expected


def test_chat_stream_without_usage_sends_none(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=GPT, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert all(chunk.usage is None and chunk.choices for chunk in stream)


def test_responses_api(oai: openai.OpenAI) -> None:
    reply = oai.responses.create(
        model=GPT, instructions="be brief", input=LONG, max_output_tokens=16
    )
    body = {"instructions": "be brief", "input": LONG, "max_output_tokens": 16}
    assert reply.output_text == "".join(output_words(16))
    assert reply.usage is not None
    assert _responses_usage(reply.usage) == expected_usage("openai_responses", body)


def test_responses_stream(oai: openai.OpenAI) -> None:
    items: list[Any] = [{"role": "user", "content": [{"type": "input_text", "text": LONG}]}]
    with oai.responses.stream(model=GPT, input=items, max_output_tokens=9) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 9
    assert final.output_text == "".join(output_words(9))
    assert final.usage is not None
    body = {"input": items, "max_output_tokens": 9}
    assert _responses_usage(final.usage) == expected_usage("openai_responses", body)


def test_anthropic_message(claude: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": LONG}]
    reply = claude.messages.create(model=CLAUDE, max_tokens=12, system="terse", messages=messages)
    body = {"system": "terse", "messages": messages, "max_tokens": 12}
    assert reply.model == CLAUDE
    assert reply.stop_reason == "max_tokens"
    assert [block.type for block in reply.content] == ["text"]
    assert _anthropic_usage(reply.usage) == expected_usage("anthropic_messages", body)


def test_anthropic_stream_with_cache(claude: anthropic.Anthropic) -> None:
    system: list[Any] = [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]
    messages: list[Any] = [{"role": "user", "content": "go"}]
    with claude.messages.stream(
        model=CLAUDE, max_tokens=30, system=system, messages=messages
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert texts == output_words(30)
    expected = expected_usage(
        "anthropic_messages", {"system": system, "messages": messages, "max_tokens": 30}
    )
    assert expected.cache_read_tokens > 0
    assert expected.cache_write_tokens > 0
    assert _anthropic_usage(final.usage) == expected


def test_error_status_has_provider_shape(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    with pytest.raises(openai.RateLimitError) as oai_error:
        oai.chat.completions.create(
            model=GPT,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-status": "429"},
        )
    assert oai_error.value.code == "rate_limit_exceeded"
    with pytest.raises(anthropic.APIStatusError) as claude_error:
        claude.messages.create(
            model=CLAUDE,
            max_tokens=5,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-status": "529"},
        )
    assert claude_error.value.status_code == 529
    assert isinstance(claude_error.value.body, dict)
    assert claude_error.value.body["error"]["type"] == "overloaded_error"


def test_bad_request_without_model(base_url: str) -> None:
    reply = httpx.post(f"{base_url}/v1/messages", json={"messages": []})
    assert reply.status_code == 400
    assert reply.json()["type"] == "error"


def test_gzip_json_body(base_url: str, oai: openai.OpenAI) -> None:
    body: dict[str, Any] = {"model": GPT, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json=body, headers={"x-fake-gzip": "1"}
    ) as reply:
        raw = b"".join(reply.iter_raw())
    assert reply.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw))["model"] == GPT
    # The SDK decodes it transparently.
    messages: list[Any] = body["messages"]
    sdk = oai.chat.completions.create(
        model=GPT, messages=messages, extra_headers={"x-fake-gzip": "1"}
    )
    assert sdk.usage is not None
    assert _chat_usage(sdk.usage) == expected_usage("openai_chat", body)


def test_seen_headers_and_log(base_url: str) -> None:
    httpx.delete(f"{base_url}/_seen")
    headers = {"x-sidecar-email": "a@example.com", "x-request-id": "r-1", "other": "no"}
    body = {"model": GPT, "input": "hi"}
    reply = httpx.post(f"{base_url}/workers-ai/v1/responses", json=body, headers=headers)
    assert reply.status_code == 200
    echoed = json.loads(reply.headers["x-fake-seen-headers"])
    assert echoed == {"x-sidecar-email": "a@example.com", "x-request-id": "r-1"}
    seen = httpx.get(f"{base_url}/_seen").json()["requests"]
    assert len(seen) == 1
    assert seen[0]["method"] == "POST"
    assert seen[0]["path"] == "/workers-ai/v1/responses"
    assert seen[0]["headers"]["other"] == "no"
    assert seen[0]["body"] == body
    assert httpx.delete(f"{base_url}/_seen").json() == {"requests": []}


def test_delay_between_stream_frames(base_url: str) -> None:
    body = {"model": CLAUDE, "max_tokens": 3, "stream": True, "messages": []}
    started = time.monotonic()
    reply = httpx.post(f"{base_url}/v1/messages", json=body, headers={"x-fake-delay-ms": "30"})
    assert reply.status_code == 200
    # message_start, block start, ping, 3 deltas, block stop, message_delta, message_stop.
    assert time.monotonic() - started >= 8 * 0.03


@pytest.mark.parametrize(
    ("path", "api", "extra"),
    [
        ("/openai/v1/chat/completions", "openai_chat", {"stream_options": {"include_usage": True}}),
        ("/v1/responses", "openai_responses", {}),
        ("/anthropic/v1/messages", "anthropic_messages", {}),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("gzipped", [False, True])
def test_metering_reads_what_the_fake_reports(
    path: str, api: Api, extra: dict[str, Any], stream: bool, gzipped: bool
) -> None:
    body = {"model": "m", "max_tokens": 11, "max_output_tokens": 11, "stream": stream, **extra}
    body["messages" if api != "openai_responses" else "input"] = [{"role": "user", "content": LONG}]
    headers = {"x-fake-gzip": "1"} if gzipped else {}
    with (
        TestClient(create_app()) as client,
        client.stream("POST", path, json=body, headers=headers) as reply,
    ):
        meter = UsageMeter.for_response(
            api, reply.headers["content-type"], reply.headers.get("content-encoding", "")
        )
        for chunk in reply.iter_raw():
            meter.feed(chunk)
    meter.finish()
    assert meter.error is None
    assert meter.complete
    assert meter.usage == expected_usage(api, body)


def test_runs_as_a_module(tmp_path: Path) -> None:
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    # From another directory and without the PYTHONPATH a test run may have: the harness
    # (not installed) finds itself through harness_env alone, as on a fresh clone.
    fresh = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "-m", "devtools.fake_provider", "--host", "127.0.0.1"]
    process = subprocess.Popen(
        [*command, "--port", str(port)], env=harness_env(fresh), cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/_seen")
                break
            except httpx.TransportError:
                assert process.poll() is None, "the fake provider exited"
                assert time.monotonic() < deadline, "the fake provider did not start"
                time.sleep(0.05)
        assert reply.json() == {"requests": []}
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- keys ------------------------------------------------------------------------------------

KEYED = {"openai": ["sk-a", "sk-b"], "anthropic": ["sk-ant"]}
CHAT_BODY = {"model": GPT, "messages": [{"role": "user", "content": "hi"}]}
MESSAGES_BODY = {"model": CLAUDE, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def test_keyed_provider_refuses_a_call_without_its_key_in_openai_shape() -> None:
    with TestClient(create_app(KEYED)) as client:
        refused = client.post(
            "/openai/v1/chat/completions",
            json=CHAT_BODY,
            headers={"authorization": "Bearer sk-wrong"},
        )
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        for key in KEYED["openai"]:
            accepted = client.post(
                "/openai/v1/chat/completions",
                json=CHAT_BODY,
                headers={"authorization": f"Bearer {key}"},
            )
            assert accepted.status_code == 200


def test_keyed_anthropic_reads_x_api_key_and_answers_its_own_shape() -> None:
    with TestClient(create_app(KEYED)) as client:
        refused = client.post(
            "/anthropic/v1/messages", json=MESSAGES_BODY, headers={"authorization": "Bearer sk-ant"}
        )
        assert refused.status_code == 401
        assert refused.json() == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        }
        ok = client.post(
            "/anthropic/v1/messages", json=MESSAGES_BODY, headers={"x-api-key": "sk-ant"}
        )
        assert ok.status_code == 200


def test_provider_is_told_by_host_when_a_proxy_stripped_the_prefix() -> None:
    with TestClient(create_app(KEYED)) as client:
        as_anthropic = client.post(
            "/v1/messages",
            json=MESSAGES_BODY,
            headers={"host": "api.anthropic.com", "x-api-key": "nope"},
        )
        assert as_anthropic.status_code == 401
        unkeyed = client.post(
            "/v1/chat/completions", json=CHAT_BODY, headers={"host": "api.cloudflare.com"}
        )
        assert unkeyed.status_code == 200  # workers-ai has no keys configured here
        models = client.get("/v1/models", headers={"host": "api.openai.com"})
        assert models.status_code == 401


def test_unknown_key_provider_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown provider"):
        create_app({"opneai": ["k"]})


# --- replaying recorded responses ----------------------------------------------------------


def test_replay_serves_a_recorded_file_byte_for_byte_in_pieces(tmp_path: Path) -> None:
    stream = b'event: a\ndata: {"x": 1}\n\nevent: b\ndata: {"y": 2}\n\n'
    (tmp_path / "rec.sse").write_bytes(stream)
    (tmp_path / "rec.json").write_bytes(b'{"usage": {"input_tokens": 3}}')
    client = TestClient(create_app(replay_dir=tmp_path))
    body = {"model": CLAUDE, "messages": [], "stream": True}
    with client.stream(
        "POST",
        "/v1/messages",
        json=body,
        headers={"x-fake-replay": "rec.sse", "x-fake-chunk-bytes": "7"},
    ) as r:
        pieces = list(r.iter_raw())
    assert b"".join(pieces) == stream and max(len(p) for p in pieces) <= 7
    answer = client.post("/v1/messages", json=body, headers={"x-fake-replay": "rec.json"})
    assert answer.headers["content-type"] == "application/json"
    assert answer.content == b'{"usage": {"input_tokens": 3}}'


@pytest.mark.parametrize("name", ["../secret.json", "rec.txt", "missing.json", ".hidden.sse"])
def test_replay_refuses_names_outside_the_directory_or_not_recorded(
    tmp_path: Path, name: str
) -> None:
    (tmp_path.parent / "secret.json").write_text("{}")
    (tmp_path / "rec.txt").write_text("{}")
    (tmp_path / ".hidden.sse").write_text("data: {}\n\n")
    client = TestClient(create_app(replay_dir=tmp_path))
    answer = client.post(
        "/v1/messages", json={"model": CLAUDE, "messages": []}, headers={"x-fake-replay": name}
    )
    assert answer.status_code == 404 and answer.json()["type"] == "error"


def test_replay_needs_a_replay_dir() -> None:
    answer = TestClient(create_app()).post(
        "/v1/chat/completions", json={"model": GPT}, headers={"x-fake-replay": "rec.json"}
    )
    assert answer.status_code == 404


# --- Gemini, Azure OpenAI, Bedrock, embeddings -------------------------------------------

GEMINI_BODY = {
    "contents": [{"role": "user", "parts": [{"text": LONG}]}],
    "generationConfig": {"maxOutputTokens": 11},
}
CONVERSE_BODY = {
    "messages": [{"role": "user", "content": [{"text": LONG}]}],
    "inferenceConfig": {"maxTokens": 11},
}
INVOKE_BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 11,
    "messages": [{"role": "user", "content": LONG}],
}
EVENTSTREAM = "application/vnd.amazon.eventstream"


@pytest.mark.parametrize(
    ("path", "api", "body", "stream"),
    [
        ("/gemini/v1beta/models/gemini-2.5-flash:generateContent", "gemini", GEMINI_BODY, False),
        (
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            "gemini",
            GEMINI_BODY,
            True,
        ),
        (
            "/bedrock/model/amazon.nova-lite-v1%3A0/converse",
            "bedrock_converse",
            CONVERSE_BODY,
            False,
        ),
        ("/model/amazon.nova-lite-v1%3A0/converse-stream", "bedrock_converse", CONVERSE_BODY, True),
        (
            "/model/anthropic.claude-haiku-4-5-20251001-v1%3A0/invoke",
            "bedrock_invoke",
            INVOKE_BODY,
            False,
        ),
        (
            "/model/anthropic.claude-haiku-4-5-20251001-v1%3A0/invoke-with-response-stream",
            "bedrock_invoke",
            INVOKE_BODY,
            True,
        ),
        (
            "/azure/openai/deployments/prod/chat/completions?api-version=2024-10-21",
            "openai_chat",
            {
                "messages": [{"role": "user", "content": LONG}],
                "max_tokens": 11,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            True,
        ),
        (
            "/v1/embeddings",
            "openai_embeddings",
            {"model": "text-embedding-3-small", "input": [LONG, "x"]},
            False,
        ),
    ],
)
def test_metering_reads_what_each_api_of_the_fake_reports(
    path: str, api: Api, body: dict[str, Any], stream: bool
) -> None:
    with TestClient(create_app()) as client, client.stream("POST", path, json=body) as reply:
        assert reply.status_code == 200
        media = reply.headers["content-type"]
        if stream:
            assert media.startswith(
                EVENTSTREAM if api.startswith("bedrock") else "text/event-stream"
            )
        meter = UsageMeter.for_response(api, media, "")
        for chunk in reply.iter_raw():
            meter.feed(chunk)
    meter.finish()
    assert (meter.error, meter.complete) == (None, True)
    assert meter.usage == expected_usage(api, body)


def test_gemini_and_azure_keys_are_read_from_their_own_headers() -> None:
    keys = {"gemini": ["AIza-1"], "azure": ["az-1"]}
    gemini = "/v1beta/models/gemini-2.5-flash:generateContent"
    azure = "/openai/deployments/prod/chat/completions"
    with TestClient(create_app(keys)) as client:
        refused = client.post(
            gemini,
            json=GEMINI_BODY,
            headers={"host": "generativelanguage.googleapis.com", "authorization": "Bearer AIza-1"},
        )
        assert refused.status_code == 401
        assert refused.json()["error"]["status"] == "UNAUTHENTICATED"
        assert (
            client.post(
                gemini,
                json=GEMINI_BODY,
                headers={"host": "generativelanguage.googleapis.com", "x-goog-api-key": "AIza-1"},
            ).status_code
            == 200
        )
        host = {"host": "acme.openai.azure.com"}
        assert (
            client.post(
                azure, json=CHAT_BODY, headers={**host, "authorization": "Bearer az-1"}
            ).status_code
            == 401
        )
        assert (
            client.post(
                azure, json={**CHAT_BODY, "model": "prod"}, headers={**host, "api-key": "az-1"}
            ).status_code
            == 200
        )


def test_path_model_apis_refuse_a_body_naming_another_model_and_unknown_verbs() -> None:
    with TestClient(create_app()) as client:
        other = client.post(
            "/v1beta/models/gemini-2.5-flash:generateContent",
            json={**GEMINI_BODY, "model": "gemini-2.5-pro"},
        )
        assert other.status_code == 400 and other.json()["error"]["code"] == 400
        unknown = client.post("/v1beta/models/gemini-2.5-flash:fooBar", json=GEMINI_BODY)
        assert unknown.status_code == 404
        bedrock = client.post(
            "/model/amazon.nova-lite-v1%3A0/converse",
            headers={"x-fake-status": "429"},
            json=CONVERSE_BODY,
        )
        assert bedrock.status_code == 429 and "message" in bedrock.json()


def test_gemini_thinking_budget_adds_thought_tokens_to_the_output() -> None:
    thinking = {
        **GEMINI_BODY,
        "generationConfig": {"maxOutputTokens": 11, "thinkingConfig": {"thinkingBudget": 500}},
    }
    assert expected_usage("gemini", thinking).output_tokens == 11 + 24
    assert expected_usage("gemini", GEMINI_BODY).output_tokens == 11
    assert expected_usage("openai_embeddings", {"input": "abcd" * 10}).output_tokens == 0
