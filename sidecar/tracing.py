"""OpenTelemetry traces, opt-in: set up from the standard OTEL_* variables, free when off.

Off (no OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT set, or the exporter is `none`),
`span()` returns one shared do-nothing context manager after a module-level flag check: the
OpenTelemetry packages are not even imported and no span object is made.

On, a decision is a span whose parent is the W3C `traceparent` that Envoy sent (in the gRPC
metadata of the Check when Envoy itself traces, else the request's own header in the
CheckRequest), so one trace shows Envoy → sidecar → store. Attributes name the identity's
kind and groups, the model, provider, rules and estimate: never a user, an email, a header
or a credential.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from sidecar.model import Decision

log = structlog.get_logger("sidecar.tracing")

# Read on every span() call: the one cost the request path pays when tracing is off.
ENABLED = False
_tracer: Any = None
_provider: TracerProvider | None = None
SERVICE_NAME = "llm-spend-sidecar"


class _Off:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_OFF = _Off()


def wanted(env: Mapping[str, str]) -> bool:
    """Tracing is on when the environment names an exporter or an OTLP endpoint."""
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        exporter
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(env: Mapping[str, str] = os.environ) -> bool:
    """Set up the SDK from OTEL_* variables when they ask for traces; True when on."""
    if not wanted(env):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    exporter: SpanExporter
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    name = names[0] if names else "otlp"
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter = ConsoleSpanExporter()
    elif name == "otlp":
        protocol = env.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        )
        if protocol != "http/protobuf":
            # Only OTLP over HTTP is installed; say so rather than export nothing.
            log.warning("otlp_protocol_unsupported", protocol=protocol, using="http/protobuf")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Endpoint, headers, timeout and compression come from the OTEL_EXPORTER_OTLP_*
        # variables, read by the exporter itself.
        exporter = OTLPSpanExporter()
    else:
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: use otlp, console or none")
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    log.info("tracing_enabled", exporter=name)
    return True


def install(provider: TracerProvider) -> None:
    """Trace through `provider` (configure() calls this; tests pass an in-memory one)."""
    global ENABLED, _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("sidecar")
    ENABLED = True


def uninstall() -> None:
    global ENABLED, _tracer, _provider
    ENABLED, _tracer, _provider = False, None, None


def shutdown() -> None:
    """Flush spans still buffered (on drain)."""
    if _provider is not None:
        _provider.shutdown()


def span(
    name: str, parent: Mapping[str, str] | None = None, **attributes: Any
) -> AbstractContextManager[Span | None]:
    """A span around a block, as a child of the current one; `attributes` are recorded under
    `sidecar.<name>`. With `parent` (headers carrying a `traceparent`) and no current span,
    that remote span is the parent. Off: None."""
    if not ENABLED:
        return _OFF
    return _start(name, parent, attributes)


@contextmanager
def _start(
    name: str, parent: Mapping[str, str] | None, attributes: dict[str, Any]
) -> Iterator[Span]:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = None
    if parent is not None and not trace.get_current_span().get_span_context().is_valid:
        context = TraceContextTextMapPropagator().extract(parent)
    kind = trace.SpanKind.CLIENT if name.startswith("sidecar.store.") else trace.SpanKind.INTERNAL
    with _tracer.start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes={f"sidecar.{k}": v for k, v in attributes.items()},
    ) as current:
        yield current


@contextmanager
def remote_parent(carrier: Mapping[str, str]) -> Iterator[None]:
    """Make the span in `carrier`'s `traceparent` current, if it names one."""
    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    extracted = TraceContextTextMapPropagator().extract(carrier)
    if not trace.get_current_span(extracted).get_span_context().is_valid:
        yield
        return
    token = context.attach(extracted)
    try:
        yield
    finally:
        context.detach(token)


def adopt(carrier: Mapping[str, str]) -> None:
    """Unless a span is current, make `carrier`'s remote span current for the rest of the
    running task (a gRPC stream's handler): spans it starts later, in tasks too, are its
    children. The task's context ends with it, so nothing is left attached elsewhere."""
    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if trace.get_current_span().get_span_context().is_valid:
        return
    extracted = TraceContextTextMapPropagator().extract(carrier)
    if trace.get_current_span(extracted).get_span_context().is_valid:
        context.attach(extracted)


def describe(current: Span | None, decision: Decision) -> None:
    """The decision's attributes on its span: what was decided and why, no credentials."""
    if current is None:
        return
    identity = decision.identity
    values: dict[str, Any] = {
        "sidecar.decision": "allow"
        if decision.reason == "ok"
        else ("fallback" if decision.reason == "fallback" else "deny"),
        "sidecar.reason": decision.reason,
        "sidecar.status": decision.http_status,
        "sidecar.rules": list(decision.rules),
    }
    if identity is not None:
        values["sidecar.identity.kind"] = identity.kind
        values["sidecar.identity.groups"] = list(identity.groups)
    if decision.model:
        values["sidecar.model"] = decision.model
    if decision.provider:
        values["sidecar.provider"] = decision.provider
    if decision.estimate is not None:
        values["sidecar.estimate_micro_usd"] = decision.estimate
    current.set_attributes(values)
