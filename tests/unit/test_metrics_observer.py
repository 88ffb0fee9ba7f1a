"""The Check path's histogram observer records exactly what `Histogram.observe` does, and
the in-flight gauge reads the shedder's count whenever it is exported."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from sidecar.metrics import REGISTRY, observer
from sidecar.overload import LoadShedder

BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
VALUES = [0.0, -1.0, 0.0005, 0.00050001, 0.001, 0.0015, 0.25, 1.0, 1.5, 1e9, float("inf")]
VALUES += [float("nan"), 0.0001 * 3]


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    ]


def made(labels: bool) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    histogram = Histogram(
        "h_seconds", "h", ["op"] if labels else [], registry=registry, buckets=BOUNDS
    )
    return registry, histogram.labels("x") if labels else histogram


@pytest.mark.parametrize("labels", [False, True])
def test_the_observer_records_what_observe_records(labels: bool) -> None:
    (slow_registry, slow), (fast_registry, fast) = made(labels), made(labels)
    observe = observer(fast)
    for value in VALUES:
        slow.observe(value)
        observe(value)
    slow_samples, fast_samples = samples(slow_registry), samples(fast_registry)
    assert len(fast_samples) == len(slow_samples) > len(BOUNDS)
    for (name, seen, got), (want_name, want_seen, want) in zip(
        fast_samples, slow_samples, strict=True
    ):
        assert (name, seen) == (want_name, want_seen)
        assert got == want or (got != got and want != want), name


def test_the_inflight_gauge_is_the_count_when_exported() -> None:
    shedder = LoadShedder(max_inflight=8, max_loop_lag=1.0)
    first, second = shedder.begin(), shedder.begin()
    shedder.export()
    assert REGISTRY.get_sample_value("sidecar_checks_inflight") == 2
    shedder.end(first, None)
    shedder.end(second, 1.0)
    shedder.export()
    assert REGISTRY.get_sample_value("sidecar_checks_inflight") == 0
