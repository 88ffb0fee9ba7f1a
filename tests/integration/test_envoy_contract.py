"""Envoy contract: deploy/envoy/envoy.yaml end to end against small in-test gRPC servicers.

No sidecar Python runs here. A real Envoy loads the deployed config (its `sidecar
envoy-config` pieces, the metering Lua filter included; only addresses changed), talks to a
minimal ext_authz + ext_proc + access log servicer and forwards to a recording upstream. The
servicers are deliberately tiny: they show what the sidecar's own servicers must do for
Envoy to behave as the product needs (allow with headers, deny with a JSON 429, re-route to
a fallback, rewrite the model in the body, stream SSE past the Lua filter, receive one
metering record per admitted call), and the tests pin the Envoy behaviours those servicers
rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
import uvicorn
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from devtools.envoy_config import DEFAULT_SOURCE, render_envoy_config, write_envoy_config
from devtools.procs import LOOPBACK, ManagedProcess, envoy_binary, free_port, start_envoy
from sidecar.metering.request_body import insert_usage_option

# The servers live in a module-scoped fixture, so the tests must share its event loop.
in_module_loop = pytest.mark.asyncio(loop_scope="module")

# Test knobs, sent by the client. The real sidecar decides from identity and budgets.
DECISION_HEADER = "x-test-decision"  # allow | deny | fallback
TEST_ID_HEADER = "x-test-id"  # finds one test's records among the module's
STALE_LENGTH_HEADER = "x-test-stale-content-length"  # rewrite the body, keep the old length
STRIP_HEADER = "x-test-strip-usage"  # ext_proc asks the Lua filter to drop the usage event
BODY_HEADER = "x-test-body"  # the Check marks the call for ext_proc, or for the Lua insert
USAGE_EVENT_HEADER = "x-test-usage-event"  # the upstream ends its stream with a usage event
SPLIT_HEADER = "x-test-split-events"  # the upstream sends each event in two writes
JOINED_HEADER = "x-test-joined-events"  # the upstream sends every event in one write
CRLF_HEADER = "x-test-crlf"  # the upstream ends its lines with CRLF
ACCENT_HEADER = "x-test-accent"  # the upstream's first event holds non-ASCII text

# Client-sent copies of these must never select a route; the Check removes them.
ROUTING_HEADERS = ("x-sidecar-route", "x-sidecar-provider", "x-sidecar-model")
FALLBACK_MODEL = "m"

STREAM_EVENTS = 4
STREAM_GAP_S = 0.5

ProcessingResponse = external_processor_pb2.ProcessingResponse


# --- ext_authz ---------------------------------------------------------------------------


def header_option(key: str, value: str) -> Any:
    # Overwrite, never append: a client-sent x-sidecar-email must not survive beside ours.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def reservation(test_id: str) -> str:
    return f"rid-{test_id}"


def allow(set_headers: dict[str, str]) -> Any:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[header_option(k, v) for k, v in set_headers.items()],
            # Removing (not just ignoring) client-sent routing headers matters: Envoy chose
            # the first route from the client's headers, and only a mutation makes
            # clear_route_cache choose again. Envoy applies removals after sets, so a
            # header that is set must not be listed here too.
            headers_to_remove=[h for h in ROUTING_HEADERS if h not in set_headers],
            response_headers_to_add=[header_option("x-sidecar-budget-remaining", "12.5")],
        ),
    )


def deny_429() -> Any:
    body = {
        "success": False,
        "error": {"type": "spend_limit_exceeded", "message": "budget used up", "rule": "r"},
    }
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.TooManyRequests),
            headers=[
                header_option("content-type", "application/json"),
                header_option("retry-after", "30"),
            ],
            body=json.dumps(body),
        ),
    )


class Authorization:
    """ext_authz `Check`; the answer is chosen by the x-test-decision request header."""

    def __init__(self) -> None:
        self.checks: list[Any] = []  # AttributeContext.HttpRequest, as Envoy sent it

    async def Check(self, request: Any, context: Any) -> Any:
        http = request.attributes.request.http
        self.checks.append(http)
        decision = http.headers.get(DECISION_HEADER, "allow")
        if decision == "deny":
            return deny_429()
        identity = {"x-sidecar-email": "caller@example.com"}
        # As the sidecar does for every admitted LLM call: the reservation the metering
        # record will name. The Lua filter takes it off the request before it goes upstream.
        test_id = http.headers.get(TEST_ID_HEADER)
        if test_id:
            identity["x-sidecar-request-id"] = reservation(test_id)
        body = http.headers.get(BODY_HEADER, "")
        if decision == "fallback" or body == "ext_proc":
            # The sidecar's mark for calls whose body ext_proc must change: only those
            # open an ext_proc stream.
            identity["x-sidecar-body"] = "rewrite"
        if decision == "fallback":
            route = {
                "x-sidecar-route": "fallback",
                "x-sidecar-provider": "workers-ai",
                "x-sidecar-model": FALLBACK_MODEL,
            }
            return allow(identity | route)
        answer = allow(identity)
        if body == "insert_usage_option":
            answer.dynamic_metadata.fields["sidecar"].struct_value.fields[
                "body"
            ].string_value = body
        return answer


# --- ext_proc ----------------------------------------------------------------------------


@dataclass
class ProcStream:
    """What one ext_proc stream (one HTTP request) saw."""

    phases: list[str] = field(default_factory=list)
    request_headers: dict[str, str] = field(default_factory=dict)


def headers_of(header_map: Any) -> dict[str, str]:
    # Envoy 1.40 fills raw_value (bytes) and leaves value empty.
    return {h.key: h.raw_value.decode() if h.raw_value else h.value for h in header_map.headers}


def request_body_answer(stream: ProcStream, body: bytes) -> Any:
    """Replace the JSON body's `model` when the Check chose a fallback."""
    new_model = stream.request_headers.get("x-sidecar-model")
    if stream.request_headers.get("x-sidecar-route") != "fallback" or new_model is None:
        return external_processor_pb2.BodyResponse()
    document = json.loads(body)
    document["model"] = new_model
    new_body = json.dumps(document).encode()
    # In BUFFERED mode Envoy still holds the request headers, so the body answer can fix
    # content-length (removing it instead makes Envoy send the body chunked). Envoy 1.40
    # reads ext_proc header values from raw_value only.
    length = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="content-length", raw_value=str(len(new_body)).encode())
    )
    fix_length = STALE_LENGTH_HEADER not in stream.request_headers
    return external_processor_pb2.BodyResponse(
        response=external_processor_pb2.CommonResponse(
            header_mutation=external_processor_pb2.HeaderMutation(
                set_headers=[length] if fix_length else []
            ),
            body_mutation=external_processor_pb2.BodyMutation(body=new_body),
        )
    )


class ExternalProcessor:
    """ext_proc `Process`: answers every phase, since Envoy waits for each answer."""

    def __init__(self) -> None:
        self.streams: list[ProcStream] = []

    async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        stream = ProcStream()
        self.streams.append(stream)
        async for request in requests:
            phase = request.WhichOneof("request")
            stream.phases.append(phase)
            if phase == "request_headers":
                stream.request_headers = headers_of(request.request_headers.headers)
                # As the sidecar does: the Check's mark that sent the call here stops here.
                yield ProcessingResponse(
                    request_headers=external_processor_pb2.HeadersResponse(
                        response=external_processor_pb2.CommonResponse(
                            header_mutation=external_processor_pb2.HeaderMutation(
                                remove_headers=["x-sidecar-body"]
                            )
                        )
                    )
                )
            elif phase == "request_body":
                answer = ProcessingResponse(
                    request_body=request_body_answer(stream, request.request_body.body)
                )
                if STRIP_HEADER in stream.request_headers:
                    # What the sidecar says when it turned usage on for a client that did
                    # not ask: the Lua filter then drops that event from the client's stream.
                    answer.dynamic_metadata.fields["sidecar.body"].struct_value.fields[
                        "strip_usage"
                    ].bool_value = True
                yield answer
            else:
                # Responses are read by the Lua filter, never sent here; trailers are SKIP.
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"unexpected {phase}")


# --- access log ----------------------------------------------------------------------------


class AccessLog:
    """The metering records Envoy sends (envoy.access_loggers.http_grpc)."""

    def __init__(self) -> None:
        self.entries: list[Any] = []

    async def StreamAccessLogs(self, requests: AsyncIterator[Any], context: Any) -> Any:
        async for message in requests:
            self.entries.extend(message.http_logs.log_entry)
        return als_pb2.StreamAccessLogsResponse()


def metering(entry: Any) -> dict[str, Any]:
    fields = entry.common_properties.metadata.filter_metadata["sidecar.metering"].fields
    return {
        key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
        for key, value in fields.items()
    }


def record_body(record: dict[str, Any]) -> bytes:
    return b"".join(record[f"c{i}"].encode() for i in range(1, int(record["chunks"]) + 1))


# --- upstream ----------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamRequest:
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


USAGE_EVENT = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}\n\n'


def sse_event(index: int) -> bytes:
    return f"data: {json.dumps({'index': index})}\n\n".encode()


def stream_events(headers: Mapping[str, str]) -> list[bytes]:
    """The events the recording upstream streams for a request with these test knobs."""
    sent = [sse_event(index) for index in range(STREAM_EVENTS)]
    if ACCENT_HEADER in headers:
        sent[0] = 'data: {"text": "café"}\n\n'.encode()
    if USAGE_EVENT_HEADER in headers:
        sent.append(USAGE_EVENT)
    if CRLF_HEADER in headers:
        sent = [event.replace(b"\n", b"\r\n") for event in sent]
    return sent


def recording_upstream(seen: list[UpstreamRequest]) -> Starlette:
    async def events(sent: list[bytes], split: bool, joined: bool) -> AsyncIterator[bytes]:
        if joined:
            yield b"".join(sent)
            return
        for index, event in enumerate(sent):
            if index:
                await asyncio.sleep(STREAM_GAP_S)
            if split:  # the event's two halves reach Envoy as two chunks
                yield event[: len(event) // 2]
                await asyncio.sleep(STREAM_GAP_S / 5)
                yield event[len(event) // 2 :]
            else:
                yield event

    async def handle(request: Request) -> Response:
        body = await request.body()
        seen.append(UpstreamRequest(request.url.path, list(request.headers.items()), body))
        if body.lstrip().startswith(b"{") and json.loads(body).get("stream"):
            return StreamingResponse(
                events(
                    stream_events(request.headers),
                    SPLIT_HEADER in request.headers,
                    JOINED_HEADER in request.headers,
                ),
                media_type="text/event-stream",
            )
        return JSONResponse({"id": "resp-1", "usage": {"prompt_tokens": 3, "completion_tokens": 5}})

    return Starlette(routes=[Route("/{path:path}", handle, methods=["POST"])])


class QuietServer(uvicorn.Server):
    """uvicorn without its SIGINT/SIGTERM handlers, which belong to pytest here."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# --- the stack ---------------------------------------------------------------------------


@dataclass
class Stack:
    client: httpx.AsyncClient
    authz: Authorization
    ext_proc: ExternalProcessor
    access_log: AccessLog
    upstream: list[UpstreamRequest]
    upstream_port: int
    envoy: ManagedProcess
    grpc_port: int

    def checks_for(self, test_id: str) -> list[Any]:
        return [c for c in self.authz.checks if c.headers.get(TEST_ID_HEADER) == test_id]

    def streams_for(self, test_id: str) -> list[ProcStream]:
        streams = self.ext_proc.streams
        return [s for s in streams if s.request_headers.get(TEST_ID_HEADER) == test_id]

    def upstream_for(self, test_id: str) -> list[UpstreamRequest]:
        return [r for r in self.upstream if r.header(TEST_ID_HEADER) == [test_id]]

    async def record_for(self, test_id: str) -> dict[str, Any]:
        """The one metering record Envoy sends for this test's call (batched: waited for)."""
        deadline = time.monotonic() + 10
        while True:
            found = [
                (e, metering(e))
                for e in self.access_log.entries
                if metering(e).get("rid") == reservation(test_id)
            ]
            if found:
                ((entry, record),) = found
                return {**record, "_entry": entry}
            assert time.monotonic() < deadline, "no metering record arrived"
            await asyncio.sleep(0.02)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    authz, ext_proc, seen = Authorization(), ExternalProcessor(), list[UpstreamRequest]()
    access_log = AccessLog()

    grpc_server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(authz, grpc_server)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(ext_proc, grpc_server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(access_log, grpc_server)
    grpc_port = grpc_server.add_insecure_port(f"{LOOPBACK}:0")
    await grpc_server.start()

    upstream_port = free_port()
    upstream_config = uvicorn.Config(
        recording_upstream(seen),
        host=LOOPBACK,
        port=upstream_port,
        log_level="warning",
        lifespan="off",
    )
    upstream = QuietServer(upstream_config)
    upstream_task = asyncio.create_task(upstream.serve())

    listen_port, admin_port = free_port(), free_port()
    config = render_envoy_config(
        listen_port=listen_port,
        admin_port=admin_port,
        sidecar_grpc=(LOOPBACK, grpc_port),
        provider_upstream=(LOOPBACK, upstream_port),
    )
    tmp_dir = tmp_path_factory.mktemp("envoy")
    try:
        # The listener port is unique on this machine right now, so it makes a safe base id.
        envoy, port = await asyncio.to_thread(start_envoy, tmp_dir, config, listen_port)
        try:
            while not upstream.started:
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(
                base_url=f"http://{LOOPBACK}:{port}", trust_env=False, timeout=10.0
            ) as client:
                yield Stack(
                    client, authz, ext_proc, access_log, seen, upstream_port, envoy, grpc_port
                )
        finally:
            envoy.stop()
    finally:
        upstream.should_exit = True
        await upstream_task
        await grpc_server.stop(grace=None)


def request_headers(test_id: str, decision: str = "allow", **extra: str) -> dict[str, str]:
    return {TEST_ID_HEADER: test_id, DECISION_HEADER: decision} | extra


def chat_body(model: str = "gpt-4o-mini", *, stream: bool = False) -> bytes:
    messages = [{"role": "user", "content": "hello"}]
    return json.dumps({"model": model, "messages": messages, "stream": stream}).encode()


# --- tests -------------------------------------------------------------------------------


def envoy_validate(config_path: Path) -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "OK" in result.stdout


def test_deployed_config_passes_envoy_validation() -> None:
    envoy_validate(DEFAULT_SOURCE)


def test_rendered_config_for_real_providers_passes_envoy_validation(tmp_path: Path) -> None:
    # Without a fake upstream only addresses change: TLS to the providers stays as deployed.
    path = write_envoy_config(
        tmp_path / "envoy.yaml",
        listen_port=free_port(),
        admin_port=free_port(),
        sidecar_grpc=("localhost", 19001),
        provider_upstream=None,
    )
    envoy_validate(path)
    assert "api.openai.com" in path.read_text(encoding="utf-8")


@in_module_loop
async def test_allowed_request_reaches_provider_with_check_headers(stack: Stack) -> None:
    test_id = uuid.uuid4().hex
    body = chat_body()
    spoofed = {"x-sidecar-email": "mallory@example.com", "x-request-id": "chosen-by-client"}

    response = await stack.client.post(
        "/openai/v1/chat/completions",
        content=body,
        headers=request_headers(test_id, **spoofed, **{BODY_HEADER: "ext_proc"}),
    )

    assert response.status_code == 200, response.text
    assert response.headers["x-sidecar-budget-remaining"] == "12.5"
    [upstream] = stack.upstream_for(test_id)
    assert upstream.path == "/v1/chat/completions"
    assert upstream.header("host") == ["api.openai.com"]
    assert upstream.header("x-sidecar-email") == ["caller@example.com"]
    assert upstream.body == body
    # The Check gets the exact body bytes (pack_as_bytes) to read the model from.
    [check] = stack.checks_for(test_id)
    assert check.raw_body == body
    assert check.path == "/openai/v1/chat/completions"
    # One Envoy-generated x-request-id ties the Check to the ext_proc stream and to the
    # upstream call; the client's value is replaced.
    request_id = check.headers["x-request-id"]
    assert request_id != "chosen-by-client"
    [stream] = stack.streams_for(test_id)
    assert stream.request_headers["x-request-id"] == request_id
    assert upstream.header("x-request-id") == [request_id]
    assert response.headers["x-request-id"] == request_id
    # ext_proc sees the request only; the response never costs a message to the sidecar.
    assert stream.phases == ["request_headers", "request_body"]
    # The reservation id reaches neither the provider nor the client, nor ext_proc; the
    # mark that sent the call to ext_proc does not reach the provider either.
    assert upstream.header("x-sidecar-request-id") == []
    assert "x-sidecar-request-id" not in response.headers
    assert "x-sidecar-request-id" not in stream.request_headers
    assert upstream.header("x-sidecar-body") == []
    # One metering record, after the response, with the body as it passed and the timings
    # that say the provider had the request.
    record = await stack.record_for(test_id)
    assert record_body(record) == response.content and record["done"] is True
    assert record["path"] == "/openai/v1/chat/completions"
    assert record["content_type"] == "application/json"
    entry = record["_entry"]
    assert entry.response.response_code.value == 200
    assert entry.common_properties.HasField("time_to_last_upstream_tx_byte")
    # The upstream was asked for an uncompressed body, which is what gets read.
    assert upstream.header("accept-encoding") == ["identity"]


@in_module_loop
async def test_deny_reaches_client_as_json_429_and_never_the_provider(stack: Stack) -> None:
    test_id = uuid.uuid4().hex

    response = await stack.client.post(
        "/openai/v1/chat/completions", content=chat_body(), headers=request_headers(test_id, "deny")
    )

    assert response.status_code == 429
    assert response.headers["retry-after"] == "30"
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["type"] == "spend_limit_exceeded"
    assert stack.upstream_for(test_id) == []
    # A denied call has no reservation: no ext_proc stream, no metering record.
    assert stack.streams_for(test_id) == []
    # Records of calls made after it arrive; the denied call's never does.
    later = uuid.uuid4().hex
    allowed = await stack.client.post(
        "/openai/v1/chat/completions", content=chat_body(), headers=request_headers(later)
    )
    assert allowed.status_code == 200
    await stack.record_for(later)
    assert [
        e for e in stack.access_log.entries if metering(e).get("rid") == reservation(test_id)
    ] == []


@in_module_loop
async def test_fallback_from_check_reroutes_and_ext_proc_rewrites_model(stack: Stack) -> None:
    test_id = uuid.uuid4().hex
    original = {
        "model": "claude-opus-4-7",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
    }

    response = await stack.client.post(
        "/anthropic/v1/messages",
        content=json.dumps(original).encode(),
        headers=request_headers(test_id, "fallback"),
    )

    assert response.status_code == 200, response.text
    [upstream] = stack.upstream_for(test_id)
    # The workers-ai fallback route, not the /anthropic/ prefix route: its Host and its
    # OpenAI-compatible chat completions path.
    assert upstream.path == "/v1/chat/completions"
    assert upstream.header("host") == ["api.cloudflare.com"]
    assert upstream.header("x-sidecar-route") == ["fallback"]
    assert json.loads(upstream.body) == original | {"model": FALLBACK_MODEL}
    assert upstream.header("content-length") == [str(len(upstream.body))]


@in_module_loop
async def test_body_rewrite_with_stale_content_length_is_refused(stack: Stack) -> None:
    test_id = uuid.uuid4().hex

    response = await stack.client.post(
        "/anthropic/v1/messages",
        content=chat_body("a-model-name-longer-than-the-fallback"),
        headers=request_headers(test_id, "fallback", **{STALE_LENGTH_HEADER: "1"}),
    )

    # Envoy will not forward a mutated body that disagrees with content-length; it treats
    # it as an ext_proc error and answers with status_on_error.
    assert response.status_code == 503
    assert stack.upstream_for(test_id) == []


@in_module_loop
async def test_client_sent_routing_headers_do_not_select_the_fallback(stack: Stack) -> None:
    test_id = uuid.uuid4().hex
    spoofed = {
        "x-sidecar-route": "fallback",
        "x-sidecar-provider": "workers-ai",
        "x-sidecar-model": "free-model",
    }

    response = await stack.client.post(
        "/openai/v1/chat/completions",
        content=chat_body(),
        headers=request_headers(test_id, **spoofed),
    )

    assert response.status_code == 200, response.text
    [upstream] = stack.upstream_for(test_id)
    assert upstream.header("host") == ["api.openai.com"]
    assert json.loads(upstream.body)["model"] == "gpt-4o-mini"
    assert upstream.header("x-sidecar-route") == []


@in_module_loop
async def test_body_over_one_mebibyte_is_rejected_before_the_check(stack: Stack) -> None:
    test_id = uuid.uuid4().hex
    body = chat_body("x" * (1024 * 1024))

    response = await stack.client.post(
        "/openai/v1/chat/completions", content=body, headers=request_headers(test_id)
    )

    assert response.status_code == 413
    assert stack.checks_for(test_id) == []
    assert stack.upstream_for(test_id) == []


@in_module_loop
async def test_sse_response_streams_past_the_lua_filter_incrementally(stack: Stack) -> None:
    test_id = uuid.uuid4().hex
    arrivals: list[tuple[float, bytes]] = []

    start = time.monotonic()
    async with stack.client.stream(
        "POST",
        "/openai/v1/chat/completions",
        content=chat_body(stream=True),
        headers=request_headers(test_id),
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for chunk in response.aiter_raw():
            arrivals.append((time.monotonic() - start, chunk))

    expected = b"".join(sse_event(i) for i in range(STREAM_EVENTS))
    assert b"".join(chunk for _, chunk in arrivals) == expected
    first_byte, total = arrivals[0][0], arrivals[-1][0]
    assert total >= (STREAM_EVENTS - 1) * STREAM_GAP_S * 0.9
    # Buffering anywhere (Envoy, ext_proc) would deliver everything at the end.
    assert first_byte < STREAM_GAP_S, arrivals
    assert first_byte < total / 3, arrivals
    assert_events_spread_out(arrivals)
    record = await stack.record_for(test_id)
    assert record_body(record) == expected and record["done"] is True
    # The body as it passed, kept in pieces of about 4 KiB (sidecar/envoy/meter.lua): four
    # small events make one piece, so a many-chunk answer does not make a many-key record.
    assert int(record["chunks"]) == 1 and int(record["bytes"]) == len(expected)


def assert_events_spread_out(arrivals: Sequence[tuple[float, bytes]]) -> None:
    """Each SSE event reached the client in its own time slot, not batched with others."""
    completed_at: list[float] = []
    received = b""
    for at, chunk in arrivals:
        received += chunk
        completed_at.extend([at] * (received.count(b"\n\n") - len(completed_at)))
    assert len(completed_at) == STREAM_EVENTS
    gaps = [later - earlier for earlier, later in itertools.pairwise(completed_at)]
    assert all(gap > STREAM_GAP_S / 2 for gap in gaps), completed_at


@in_module_loop
async def test_lua_filter_drops_the_usage_event_ext_proc_turned_on(stack: Stack) -> None:
    test_id = uuid.uuid4().hex

    response = await stack.client.post(
        "/openai/v1/chat/completions",
        content=chat_body(stream=True),
        headers=request_headers(
            test_id, **{STRIP_HEADER: "1", USAGE_EVENT_HEADER: "1", BODY_HEADER: "ext_proc"}
        ),
    )

    events = b"".join(sse_event(i) for i in range(STREAM_EVENTS))
    assert response.status_code == 200
    assert response.content == events
    # The record still has it: that is where the sidecar reads the usage. The stream ended
    # with usage among its last events, so the record carries its first event and its last
    # four (here: all of it) instead of the body.
    record = await stack.record_for(test_id)
    assert record["trimmed"] is True and record_body(record) == b""
    assert (record["head"] + record["end"]).encode() == events + USAGE_EVENT
    assert int(record["end_offset"]) == len(sse_event(0))


@in_module_loop
async def test_lua_filter_drops_a_usage_event_split_across_chunks(stack: Stack) -> None:
    """Events arriving in halves are held until whole: the client gets each event intact,
    and the usage event (its halves in two chunks too) not at all."""
    test_id = uuid.uuid4().hex
    arrivals: list[bytes] = []

    async with stack.client.stream(
        "POST",
        "/openai/v1/chat/completions",
        content=chat_body(stream=True),
        headers=request_headers(
            test_id,
            **{
                STRIP_HEADER: "1",
                USAGE_EVENT_HEADER: "1",
                BODY_HEADER: "ext_proc",
                SPLIT_HEADER: "1",
            },
        ),
    ) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            arrivals.append(chunk)

    events = [sse_event(i) for i in range(STREAM_EVENTS)]
    assert b"".join(arrivals) == b"".join(events)
    # No half event ever reached the client: each chunk it got ends where an event ends.
    assert all(chunk.endswith(b"\n\n") for chunk in arrivals), arrivals
    record = await stack.record_for(test_id)
    assert (record["head"] + record["end"]).encode() == b"".join(events) + USAGE_EVENT


@pytest.mark.parametrize(
    "knobs",
    [
        # One chunk holds every event, the usage event among them, and ends with one.
        {JOINED_HEADER: "1"},
        # Events end with CRLF blank lines: whole, joined, and in halves.
        {CRLF_HEADER: "1"},
        {CRLF_HEADER: "1", JOINED_HEADER: "1"},
        {CRLF_HEADER: "1", SPLIT_HEADER: "1"},
        # Text that is not ASCII, in whole events and in halves.
        {ACCENT_HEADER: "1"},
        {ACCENT_HEADER: "1", SPLIT_HEADER: "1"},
    ],
    ids=["joined", "crlf", "crlf-joined", "crlf-split", "accent", "accent-split"],
)
@in_module_loop
async def test_lua_filter_drops_the_usage_event_however_the_events_arrive(
    stack: Stack, knobs: dict[str, str]
) -> None:
    """Whole events without a usage report pass without being taken apart; the usage
    event goes however it arrives, and the record keeps every event with non-ASCII bytes
    as `~`."""
    test_id = uuid.uuid4().hex
    headers = request_headers(
        test_id, **{STRIP_HEADER: "1", USAGE_EVENT_HEADER: "1", BODY_HEADER: "ext_proc", **knobs}
    )

    response = await stack.client.post(
        "/openai/v1/chat/completions", content=chat_body(stream=True), headers=headers
    )

    sent = stream_events(headers)
    assert response.status_code == 200
    assert response.content == b"".join(sent[:-1])  # all but the usage event, byte for byte
    record = await stack.record_for(test_id)
    kept = (
        (record["head"] + record["end"]) if record.get("trimmed") else record_body(record).decode()
    )
    assert kept.encode() == re.sub(rb"[\x80-\xff]", b"~", b"".join(sent))
    assert record["done"] is True


@in_module_loop
async def test_usage_event_stays_when_ext_proc_did_not_ask(stack: Stack) -> None:
    test_id = uuid.uuid4().hex

    response = await stack.client.post(
        "/openai/v1/chat/completions",
        content=chat_body(stream=True),
        headers=request_headers(test_id, **{USAGE_EVENT_HEADER: "1"}),
    )

    assert response.content.endswith(USAGE_EVENT)


@in_module_loop
async def test_unreachable_upstream_record_shows_the_provider_never_had_it(
    stack: Stack, tmp_path: Path
) -> None:
    listen_port, admin_port, nobody_listens = free_port(), free_port(), free_port()
    config = render_envoy_config(
        listen_port=listen_port,
        admin_port=admin_port,
        sidecar_grpc=(LOOPBACK, stack.grpc_port),
        provider_upstream=(LOOPBACK, nobody_listens),
    )
    test_id = uuid.uuid4().hex

    envoy, port = await asyncio.to_thread(start_envoy, tmp_path, config, listen_port)
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
            response = await client.post(
                f"http://{LOOPBACK}:{port}/openai/v1/chat/completions",
                content=chat_body(),
                headers=request_headers(test_id),
            )
        record = await stack.record_for(test_id)
    finally:
        envoy.stop()

    assert response.status_code == 503
    entry = record["_entry"]
    assert entry.response.response_code.value == 503
    # No upstream byte was ever sent: the sidecar charges this $0.
    assert not entry.common_properties.HasField("time_to_last_upstream_tx_byte")
    assert entry.common_properties.response_flags.upstream_connection_failure


@in_module_loop
async def test_calls_without_a_body_change_never_open_an_ext_proc_stream(stack: Stack) -> None:
    test_id = uuid.uuid4().hex

    response = await stack.client.post(
        "/openai/v1/chat/completions", content=chat_body(), headers=request_headers(test_id)
    )

    assert response.status_code == 200
    assert stack.streams_for(test_id) == []
    [upstream] = stack.upstream_for(test_id)
    assert upstream.body == chat_body()
    record = await stack.record_for(test_id)
    assert record_body(record) == response.content


@in_module_loop
async def test_lua_filter_inserts_the_usage_option_and_hides_its_event(stack: Stack) -> None:
    test_id = uuid.uuid4().hex
    body = b'  {"model": "gpt-4o-mini", "stream": true, "messages": []}'

    response = await stack.client.post(
        "/openai/v1/chat/completions",
        content=body,
        headers=request_headers(
            test_id, **{BODY_HEADER: "insert_usage_option", USAGE_EVENT_HEADER: "1"}
        ),
    )

    assert response.status_code == 200
    assert stack.streams_for(test_id) == []
    [upstream] = stack.upstream_for(test_id)
    # The member goes first; the rest of the client's bytes are as sent: exactly what
    # sidecar/metering/request_body.py says the Lua filter does.
    assert upstream.body == insert_usage_option(body)
    assert (
        upstream.body == b'  {"stream_options":{"include_usage":true},"model": '
        b'"gpt-4o-mini", "stream": true, "messages": []}'
    )
    assert upstream.header("content-length") == [str(len(upstream.body))]
    events = b"".join(sse_event(i) for i in range(STREAM_EVENTS))
    assert response.content == events
    record = await stack.record_for(test_id)
    assert record["trimmed"] is True
    assert (record["head"] + record["end"]).encode() == events + USAGE_EVENT


@in_module_loop
async def test_unreachable_sidecar_fails_closed_with_503(stack: Stack, tmp_path: Path) -> None:
    listen_port, admin_port, nobody_listens = free_port(), free_port(), free_port()
    config = render_envoy_config(
        listen_port=listen_port,
        admin_port=admin_port,
        sidecar_grpc=(LOOPBACK, nobody_listens),
        provider_upstream=(LOOPBACK, stack.upstream_port),
    )
    test_id = uuid.uuid4().hex

    envoy, port = await asyncio.to_thread(start_envoy, tmp_path, config, listen_port)
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
            response = await client.post(
                f"http://{LOOPBACK}:{port}/openai/v1/chat/completions",
                content=chat_body(),
                headers=request_headers(test_id),
            )
    finally:
        envoy.stop()

    # status_on_error: a broken sidecar means "try again", not the 403 of a real denial.
    assert response.status_code == 503
    assert stack.upstream_for(test_id) == []
