"""What the microbenchmarks read back from pytest-benchmark once a benchmark has run."""

from __future__ import annotations

from pytest_benchmark.fixture import BenchmarkFixture


def median_seconds(benchmark: BenchmarkFixture) -> float:
    """The median round time of the benchmark that just ran."""
    stats = benchmark.stats
    assert stats is not None, "read after calling benchmark(...) or benchmark.pedantic(...)"
    return float(stats.stats.median)
