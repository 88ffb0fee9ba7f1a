"""Tracing is on only when the OTEL_* environment asks for it, and costs a flag check when off."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar import tracing


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    tracing.shutdown()
    tracing.uninstall()


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ],
)
def test_on_only_when_the_environment_names_an_exporter_or_endpoint(
    env: dict[str, str], on: bool
) -> None:
    assert tracing.wanted(env) is on
    assert tracing.configure(env) is on
    assert tracing.ENABLED is on


def test_off_every_span_is_one_shared_object_and_nothing_is_recorded() -> None:
    assert not tracing.configure({})
    first = tracing.span(
        "sidecar.check", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, model="m"
    )
    assert first is tracing.span("sidecar.store.reserve")
    with first as span:
        assert span is None


def test_on_spans_are_recorded() -> None:
    assert tracing.configure({"OTEL_TRACES_EXPORTER": "console"})
    # Not exited: an ended span would be printed by the console exporter.
    manager = tracing.span("sidecar.check")
    span = manager.__enter__()
    assert span is not None and span.is_recording()


def test_unknown_exporter_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER='zipkin'"):
        tracing.configure({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_traceparent_header_parents_a_span_without_a_current_one() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    header = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    with (
        tracing.span("sidecar.check", {"traceparent": header}, buckets=2),
        tracing.span("sidecar.store.reserve", {"traceparent": "garbage"}),
    ):
        pass
    inner, outer = exporter.get_finished_spans()
    assert outer.context is not None and outer.parent is not None
    assert format(outer.context.trace_id, "032x") == "a" * 32
    assert format(outer.parent.span_id, "016x") == "b" * 16
    assert dict(outer.attributes or {}) == {"sidecar.buckets": 2}
    # A current span wins over any header.
    assert inner.parent is not None and inner.parent.span_id == outer.context.span_id


def test_off_the_request_path_does_not_even_import_opentelemetry() -> None:
    probe = (
        "import sys; import sidecar.server, sidecar.engine, sidecar.envoy.authz, "
        "sidecar.envoy.ext_proc; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
