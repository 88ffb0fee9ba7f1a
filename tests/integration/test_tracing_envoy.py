"""Traces through a real Envoy: one trace per request, the decision's span parented to Envoy's
span (Envoy tracing on) or to the request's own `traceparent` (Envoy tracing off, as
deployed), children for the JWKS fetch and the store calls, a span per metering commit (from
the call's access log record), and no credential in any attribute.

The sidecar runs in this process, so the SDK's in-memory exporter sees its spans; Envoy
exports its own spans over OTLP/HTTP to a small collector in this test.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest_asyncio
import uvicorn
import yaml
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from devtools.config import demo_config
from devtools.envoy_config import render_envoy_config
from devtools.keys import DevIssuer
from devtools.procs import LOOPBACK, ManagedProcess, free_port, start_envoy, wait_for_port
from devtools.stack import fake_provider_process
from sidecar import tracing
from sidecar.envoy.access_log import AccessLogServicer
from sidecar.envoy.authz import AuthorizationServicer
from sidecar.envoy.ext_proc import ExternalProcessorServicer
from sidecar.services import Services, build_services

CHAT = "/openai/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
LIMITS = [
    {
        "name": "per-user-daily",
        "budget_usd": 50,
        "window": {"fixed": "daily"},
        "split": ["user"],
        "action": "block",
        "alerts": [50, 90, 100],
    }
]


class QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers, which belong to pytest here."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Collector:
    """Envoy's exported spans (OTLP/HTTP protobuf) and the issuer's JWKS, on one port."""

    jwks: dict[str, Any]
    spans: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def traces(request: Request) -> Response:
            export = trace_service_pb2.ExportTraceServiceRequest()
            export.ParseFromString(await request.body())
            for resource in export.resource_spans:
                for scope in resource.scope_spans:
                    self.spans += [
                        {
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_id": s.parent_span_id.hex(),
                            "name": s.name,
                        }
                        for s in scope.spans
                    ]
            return Response(
                trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                media_type="application/x-protobuf",
            )

        async def jwks(request: Request) -> Response:
            return JSONResponse(self.jwks)

        return Starlette(
            routes=[Route("/v1/traces", traces, methods=["POST"]), Route("/jwks.json", jwks)]
        )


def traced_envoy(config: dict[str, Any], collector_port: int) -> dict[str, Any]:
    """The rendered config with Envoy's OpenTelemetry tracer on, exporting to the collector."""
    config = copy.deepcopy(config)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    hcm["tracing"] = {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "http_service": {
                    "http_uri": {
                        "uri": f"http://{LOOPBACK}:{collector_port}/v1/traces",
                        "cluster": "otel_collector",
                        "timeout": "2s",
                    }
                },
                "service_name": "envoy",
            },
        }
    }
    config["static_resources"]["clusters"].append(
        {
            "name": "otel_collector",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "otel_collector",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": LOOPBACK,
                                            "port_value": collector_port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
    )
    # Export every span at once rather than in 5 s batches.
    config["layered_runtime"] = {
        "layers": [
            {
                "name": "test",
                "static_layer": {
                    "tracing.opentelemetry.flush_interval_ms": 50,
                    "tracing.opentelemetry.min_flush_spans": 1,
                },
            }
        ]
    }
    return config


@dataclass
class Traced:
    exporter: InMemorySpanExporter
    collector: Collector
    issuer: DevIssuer
    services: Services
    traced_url: str  # Envoy with its tracer on
    plain_url: str  # Envoy as deployed: no tracer, traceparent passed through


@pytest_asyncio.fixture
async def traced(tmp_path: Path, redis_url: str) -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    issuer = DevIssuer.generate()
    collector = Collector(issuer.jwks())
    collector_port = free_port()
    server = QuietServer(
        uvicorn.Config(
            collector.app(), host=LOOPBACK, port=collector_port, log_level="warning", lifespan="off"
        )
    )
    server_task = asyncio.create_task(server.serve())
    config = demo_config(
        issuer, f"http://{LOOPBACK}:{collector_port}/jwks.json", redis_url, spend_limits=LIMITS
    )
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))
    services = await build_services(config_path)
    grpc_server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationServicer(services.engine), grpc_server
    )
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessorServicer(services.engine), grpc_server
    )
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(
        AccessLogServicer(services.engine), grpc_server
    )
    grpc_port = grpc_server.add_insecure_port(f"{LOOPBACK}:0")
    await grpc_server.start()
    provider_port = free_port()
    fake = fake_provider_process(tmp_path, provider_port).start()
    envoys: list[ManagedProcess] = []
    try:
        await asyncio.to_thread(wait_for_port, LOOPBACK, provider_port, 20, process=fake)
        while not server.started:
            await asyncio.sleep(0.01)
        urls = []
        for with_tracer in (True, False):
            listen, admin = free_port(), free_port()
            rendered = render_envoy_config(
                listen_port=listen,
                admin_port=admin,
                sidecar_grpc=(LOOPBACK, grpc_port),
                provider_upstream=(LOOPBACK, provider_port),
            )
            if with_tracer:
                rendered = traced_envoy(rendered, collector_port)
            envoy, port = await asyncio.to_thread(start_envoy, tmp_path, rendered, listen)
            envoys.append(envoy)
            urls.append(f"http://{LOOPBACK}:{port}")
        yield Traced(exporter, collector, issuer, services, *urls)
    finally:
        for envoy in envoys:
            envoy.stop()
        fake.stop()
        await grpc_server.stop(grace=None)
        await services.close()
        server.should_exit = True
        await server_task
        tracing.uninstall()


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def by_trace(spans: tuple[ReadableSpan, ...], trace_id: str) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        assert span.context is not None
        if format(span.context.trace_id, "032x") == trace_id:
            found.setdefault(span.name, []).append(span)
    return found


def span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.span_id, "016x")


def parent_id(span: ReadableSpan) -> str:
    assert span.parent is not None
    return format(span.parent.span_id, "016x")


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_one_trace_per_request_parented_to_envoys_span(traced: Traced) -> None:
    token = traced.issuer.mint(f"trace-{uuid.uuid4().hex[:8]}@example.com", ["ml"])
    sent: list[tuple[str, str]] = []
    async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
        for _ in range(3):
            header, trace_id, client_span = traceparent()
            response = await client.post(
                traced.traced_url + CHAT,
                json=BODY,
                headers={"authorization": f"Bearer {token}", "traceparent": header},
            )
            assert response.status_code == 200, response.text
            sent.append((trace_id, client_span))
        header, denied_trace, _ = traceparent()
        response = await client.post(
            traced.traced_url + CHAT, json=BODY, headers={"traceparent": header}
        )
        assert response.status_code == 401
    envoy_ids = {t for t, _ in sent} | {denied_trace}

    def envoy_spans(trace_id: str) -> dict[str, dict[str, Any]]:
        return {s["span_id"]: s for s in traced.collector.spans if s["trace_id"] == trace_id}

    # Envoy exports its spans once each request has ended; the charge comes from the access
    # log record, which follows the request.
    def committed(trace_id: str) -> bool:
        named = by_trace(traced.exporter.get_finished_spans(), trace_id)
        return "sidecar.commit" in named and parent_id(named["sidecar.commit"][0]) in envoy_spans(
            trace_id
        )

    await wait_for(lambda: all(committed(t) for t, _ in sent))
    spans = traced.exporter.get_finished_spans()
    sidecar_traces = {format(s.context.trace_id, "032x") for s in spans if s.context}
    assert sidecar_traces == envoy_ids  # one trace per request, each the request's own

    for index, (trace_id, client_span) in enumerate(sent):
        named = by_trace(spans, trace_id)
        (check,) = named["sidecar.check"]
        (reserve,) = named["sidecar.store.reserve"]
        (commit,) = named["sidecar.commit"]
        (store_commit,) = named["sidecar.store.commit"]
        envoy = envoy_spans(trace_id)
        # The decision hangs off Envoy's ext_authz call span, which hangs off Envoy's span
        # for the request, whose parent is the client's.
        authz_call = envoy[parent_id(check)]
        assert "Authorization" in authz_call["name"]
        assert parent_id(check) != client_span
        assert client_span in {s["parent_id"] for s in envoy.values()}
        # The charge hangs off Envoy's span of the call, as its access log record saw it.
        assert parent_id(commit) in envoy and parent_id(commit) != parent_id(check)
        assert parent_id(reserve) == span_id(check)
        assert parent_id(store_commit) == span_id(commit)
        if index == 0:  # the first request fetched the issuer's keys, within its decision
            (fetch,) = named["sidecar.jwks.fetch"]
            assert parent_id(fetch) == span_id(check)
            assert str(dict(fetch.attributes or {})["sidecar.source"]).endswith("/jwks.json")
        else:
            assert "sidecar.jwks.fetch" not in named
        attributes = dict(check.attributes or {})
        assert attributes["sidecar.decision"] == "allow"
        assert attributes["sidecar.reason"] == "ok"
        assert attributes["sidecar.identity.kind"] == "user"
        assert tuple(attributes["sidecar.identity.groups"]) == ("ml",)  # type: ignore[arg-type]
        assert attributes["sidecar.model"] == "gpt-4o-mini"
        assert attributes["sidecar.provider"] == "openai"
        assert "per-user-daily" in attributes["sidecar.rules"]  # type: ignore[operator]
        assert int(attributes["sidecar.estimate_micro_usd"]) > 0  # type: ignore[arg-type]
        commit_attributes = dict(commit.attributes or {})
        assert commit_attributes["sidecar.commit_status"] == "committed"
        assert int(commit_attributes["sidecar.cost_micro_usd"]) > 0  # type: ignore[arg-type]

    denied = by_trace(spans, denied_trace)
    assert set(denied) == {"sidecar.check"}  # no store call and nothing to meter
    (check,) = denied["sidecar.check"]
    assert dict(check.attributes or {})["sidecar.reason"] == "missing_credentials"

    # No attribute of any span carries the token, nor a recognisable part of it.
    text = json.dumps([dict(s.attributes or {}) for s in spans], default=str)
    assert token not in text
    assert token.rsplit(".", 1)[1][:20] not in text
    assert "example.com" not in text  # nor the user


async def test_without_envoy_tracing_the_requests_traceparent_is_the_parent(traced: Traced) -> None:
    token = traced.issuer.mint("plain@example.com", ["ml"])
    header, trace_id, client_span = traceparent()
    async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
        response = await client.post(
            traced.plain_url + CHAT,
            json=BODY,
            headers={"authorization": f"Bearer {token}", "traceparent": header},
        )
    assert response.status_code == 200, response.text
    # The charge follows the call's access log record.
    await wait_for(
        lambda: "sidecar.commit" in by_trace(traced.exporter.get_finished_spans(), trace_id)
    )
    named = by_trace(traced.exporter.get_finished_spans(), trace_id)
    (check,) = named["sidecar.check"]
    (commit,) = named["sidecar.commit"]
    assert parent_id(check) == client_span
    assert check.parent is not None and check.parent.is_remote
    assert parent_id(commit) == client_span
    assert parent_id(named["sidecar.store.reserve"][0]) == span_id(check)
