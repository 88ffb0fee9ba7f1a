"""Price lookup: the cached path every decision takes, and the first lookup of a model
(genai-prices' data walked once, then cached)."""

from __future__ import annotations

from pytest_benchmark.fixture import BenchmarkFixture

from bench.micro.timing import median_seconds
from sidecar.pricing import PriceBook

MODELS = [
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-haiku-4-5"),
    ("openai", "gpt-4.1-nano"),
    ("cloudflare", "@cf/meta/llama-3.1-8b-instruct"),
]


def test_price_cached(benchmark: BenchmarkFixture) -> None:
    book = PriceBook([], None)
    for provider, model in MODELS:
        book.price(provider, model)

    def lookups() -> None:
        for provider, model in MODELS * 250:
            book.price(provider, model)

    benchmark(lookups)
    benchmark.extra_info["per_lookup_us"] = round(median_seconds(benchmark) / 1000 * 1e6, 3)


def test_price_first_lookup(benchmark: BenchmarkFixture) -> None:
    def fresh() -> None:
        book = PriceBook([], None)
        for provider, model in MODELS:
            assert book.price(provider, model) is not None

    benchmark(fresh)
