"""Prices from genai-prices and overrides, integer cost math, and request-size estimates."""

from __future__ import annotations

import math
import socket
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import types as gp_types

from sidecar import pricing
from sidecar.model import TokenUsage
from sidecar.pricing import (
    PriceBook,
    PriceOverride,
    UnitPrice,
    cost_micros,
    estimate_input_tokens,
    estimate_micros,
    requested_choices,
    requested_output_tokens,
)
from tests.support.prices import genai_micros

DEFAULT_PRICE = UnitPrice(
    input=10_000_000, output=30_000_000, cache_read=10_000_000, cache_write=10_000_000,
    source="default",
)  # fmt: skip


def priced(
    provider: str,
    model: str,
    input_per_mtok: Decimal,
    output_per_mtok: Decimal,
    cache_read_per_mtok: Decimal | None = None,
    cache_write_per_mtok: Decimal | None = None,
) -> PriceOverride:
    return PriceOverride(
        provider=provider,
        model=model,
        input_per_mtok=input_per_mtok,
        output_per_mtok=output_per_mtok,
        cache_read_per_mtok=cache_read_per_mtok,
        cache_write_per_mtok=cache_write_per_mtok,
    )


def book(*overrides: PriceOverride, unknown_model: UnitPrice | None = None) -> PriceBook:
    return PriceBook(overrides, unknown_model)


def reference_micros(model: str, provider_id: str, usage: TokenUsage) -> int:
    """genai-prices' own answer, rounded up to µUSD."""
    return genai_micros(usage, model, provider_id)


def synthetic_model(prices: list[gp_types.ConditionalPrice]) -> gp_types.ModelInfo:
    return gp_types.ModelInfo(id="m", match=gp_types.ClauseEquals(equals="m"), prices=prices)


def test_gpt_4o_has_genai_prices_rates_in_pico_per_token() -> None:
    price = book().price("openai", "gpt-4o")

    # Web searches $10 and file searches $2.50 per 1,000 calls, as pico-dollars per call.
    assert price == UnitPrice(
        input=2_500_000, output=10_000_000, cache_read=1_250_000, cache_write=2_500_000,
        source="genai-prices", cache_write_1h=2_500_000, web_search=10_000_000_000,
        file_search=2_500_000_000,
        # No audio, image or video rates: they cost what text does.
        input_audio=2_500_000, output_audio=10_000_000, cache_audio_read=1_250_000,
        input_image=2_500_000, output_image=10_000_000, input_video=2_500_000,
        output_video=10_000_000,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("provider_id", "model"),
    [
        ("openai", "gpt-4o"),
        ("openai", "gpt-4o-mini"),
        ("anthropic", "claude-opus-4-7"),
        ("anthropic", "claude-sonnet-4-5"),
        ("cloudflare", "@cf/moonshotai/kimi-k2.6"),
        ("google", "gemini-2.5-pro"),
    ],
)
@pytest.mark.parametrize(
    "usage",
    [
        TokenUsage(input_tokens=1, output_tokens=1),
        TokenUsage(
            input_tokens=1_234, output_tokens=567, cache_read_tokens=89, cache_write_tokens=10
        ),
        TokenUsage(input_tokens=150_000, output_tokens=9_000, cache_read_tokens=49_000),
        TokenUsage(input_tokens=150_000, output_tokens=9_000, cache_read_tokens=50_001),
        TokenUsage(input_tokens=400_000, output_tokens=20_000, cache_write_tokens=7_000),
    ],
)
def test_actual_cost_matches_genai_prices_including_tiers(
    provider_id: str, model: str, usage: TokenUsage
) -> None:
    price = book().price(provider_id, model)

    assert price is not None
    assert cost_micros(price, usage) == reference_micros(model, provider_id, usage)


@pytest.mark.parametrize(
    ("provider_id", "model"),
    [
        ("openai", "gpt-audio-mini"),  # audio in and out priced apart, no cache rate
        ("google", "gemini-2.5-flash"),  # audio input and cached audio priced apart
        ("google", "gemini-2.0-flash"),
        ("openai", "gpt-4o-mini"),  # no audio rates at all: audio costs what text does
        ("google", "gemini-2.5-flash-image"),  # image output at $30 against $2.50
        ("google", "gemini-3-pro-image-preview"),
        ("google", "gemini-live-2.5-flash"),  # image and video input priced apart
    ],
)
@pytest.mark.parametrize(
    "usage",
    [
        TokenUsage(input_tokens=1_000, output_tokens=500, input_audio_tokens=800),
        TokenUsage(input_tokens=1_000, output_tokens=500, output_audio_tokens=450),
        TokenUsage(
            input_tokens=2_000, output_tokens=300, cache_read_tokens=1_000,
            input_audio_tokens=1_500, cache_audio_read_tokens=600, output_audio_tokens=200,
        ),
        TokenUsage(input_tokens=300, output_tokens=1_300, output_image_tokens=1_290),
        TokenUsage(
            input_tokens=5_000, output_tokens=400, input_image_tokens=1_000,
            input_video_tokens=3_000, input_audio_tokens=500, output_video_tokens=100,
        ),
    ],
)  # fmt: skip
def test_modalities_are_charged_at_their_own_rates_as_genai_prices_prices_them(
    provider_id: str, model: str, usage: TokenUsage
) -> None:
    price = book().price(provider_id, model)

    assert price is not None
    assert cost_micros(price, usage) == reference_micros(model, provider_id, usage)


def test_audio_costs_more_than_the_same_tokens_as_text() -> None:
    price = book().price("openai", "gpt-audio-mini")
    assert price is not None
    text = TokenUsage(input_tokens=1_000_000, output_tokens=1_000_000)
    audio = TokenUsage(
        input_tokens=1_000_000,
        output_tokens=1_000_000,
        input_audio_tokens=1_000_000,
        output_audio_tokens=1_000_000,
    )
    # $0.60 + $2.40 as text; $10 + $20 as audio.
    assert (cost_micros(price, text), cost_micros(price, audio)) == (3_000_000, 30_000_000)
    # Parts together are bounded by the count they are part of.
    both = TokenUsage(input_tokens=10, input_audio_tokens=10, input_image_tokens=10)
    assert cost_micros(price, both) == cost_micros(price, TokenUsage(10, input_audio_tokens=10))
    inflated = TokenUsage(input_tokens=10, input_audio_tokens=1_000_000)
    assert cost_micros(price, inflated) == cost_micros(
        price, TokenUsage(input_tokens=10, input_audio_tokens=10)
    )


def test_tiered_model_estimates_at_the_highest_tier() -> None:
    price = book().price("anthropic", "claude-sonnet-4-5")

    assert price is not None
    # $3 / $15 per Mtok up to 200k input tokens, $6 / $22.5 above.
    assert (price.input, price.output) == (6_000_000, 22_500_000)
    assert [(t.up_to, t.input, t.output) for t in price.tiers] == [(200_000, 3_000_000, 15_000_000)]
    assert estimate_micros(price, 1_000, 1_000) == 28_500
    assert cost_micros(price, TokenUsage(input_tokens=1_000, output_tokens=1_000)) == 18_000


def test_kimi_on_cloudflare_is_priced() -> None:
    price = book().price("cloudflare", "@cf/moonshotai/kimi-k2.6")

    assert price is not None
    assert price.source == "genai-prices"
    assert price.input > 0
    assert price.output > 0


def test_unknown_provider_id_falls_back_to_the_model_name() -> None:
    prices = book()

    assert prices.price("workers-ai", "@cf/moonshotai/kimi-k2.6") == prices.price(
        "cloudflare", "@cf/moonshotai/kimi-k2.6"
    )


def test_override_wins_over_genai_prices() -> None:
    override = priced("openai", "gpt-4o", Decimal("1"), Decimal("2"), Decimal("0.5"), None)

    price = book(override).price("openai", "gpt-4o")

    # Token rates from the override; server-tool fees still genai-prices' for the model.
    assert price == UnitPrice(
        input=1_000_000, output=2_000_000, cache_read=500_000, cache_write=1_000_000,
        source="override", web_search=10_000_000_000, file_search=2_500_000_000,
    )  # fmt: skip


def test_glob_override_matches_and_others_do_not() -> None:
    override = priced("openai", "my-finetune-*", Decimal("3"), Decimal("12"))
    prices = book(override)

    matched = prices.price("openai", "My-Finetune-v2")
    assert matched is not None
    assert (matched.input, matched.output, matched.source) == (3_000_000, 12_000_000, "override")
    assert prices.price("anthropic", "my-finetune-v2") is None
    assert prices.price("openai", "my-finetune") is None


def test_first_matching_override_wins() -> None:
    specific = priced("openai", "ft-a", Decimal("1"), Decimal("1"))
    broad = priced("*", "ft-*", Decimal("9"), Decimal("9"))

    price = book(specific, broad).price("openai", "ft-a")

    assert price is not None
    assert price.input == 1_000_000


def test_fractional_pico_prices_round_up() -> None:
    override = priced("x", "y", Decimal("0.0000001"), Decimal("0"))

    price = book(override).price("x", "y")

    assert price is not None
    assert (price.input, price.output) == (1, 0)


def test_unknown_model_is_rejected_or_gets_the_default() -> None:
    assert book().price("openai", "no-such-model-xyz") is None
    assert book(unknown_model=DEFAULT_PRICE).price("openai", "no-such-model-xyz") == DEFAULT_PRICE
    assert book().price("no-such-provider", "no-such-model-xyz") is None


def test_cost_rounds_up_to_whole_micros() -> None:
    price = book().price("openai", "gpt-4o-mini")  # $0.15 / Mtok input

    assert price is not None
    assert cost_micros(price, TokenUsage(input_tokens=1)) == 1
    assert cost_micros(price, TokenUsage()) == 0
    assert cost_micros(price, TokenUsage(input_tokens=1_000_000)) == 150_000
    assert cost_micros(price, TokenUsage(input_tokens=1_000_001)) == 150_001
    assert estimate_micros(price, 1, 0) == 1


def test_cache_tokens_use_cache_prices() -> None:
    gpt = book().price("openai", "gpt-4o")
    opus = book().price("anthropic", "claude-opus-4-7")

    assert gpt is not None
    assert opus is not None
    # gpt-4o: cache reads $1.25 / Mtok; no separate write price, so writes cost the input rate.
    assert cost_micros(gpt, TokenUsage(cache_read_tokens=1_000)) == 1_250
    assert cost_micros(gpt, TokenUsage(cache_write_tokens=1_000)) == 2_500
    # claude-opus-4-7: reads $0.50, writes $6.25 per Mtok.
    assert cost_micros(opus, TokenUsage(cache_read_tokens=1_000)) == 500
    assert cost_micros(opus, TokenUsage(cache_write_tokens=1_000)) == 6_250


def test_second_lookup_is_served_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real_lookup = pricing._lookup_model

    def counting_lookup(provider_id: str, model: str) -> gp_types.ModelInfo | None:
        calls.append((provider_id, model))
        return real_lookup(provider_id, model)

    monkeypatch.setattr(pricing, "_lookup_model", counting_lookup)
    prices = book()

    first = prices.price("openai", "gpt-4o")
    second = prices.price("openai", "gpt-4o")
    prices.price("openai", "no-such-model-xyz")
    prices.price("openai", "no-such-model-xyz")

    assert first is second
    assert calls == [("openai", "gpt-4o"), ("openai", "no-such-model-xyz")]


def test_cache_is_bounded() -> None:
    prices = PriceBook([], DEFAULT_PRICE, cache_entries=2)

    for n in range(5):
        prices.price("openai", f"unknown-{n}")

    assert prices._cached.cache_info().currsize == 2


def test_dated_price_change_takes_effect_without_a_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    model = synthetic_model(
        [
            gp_types.ConditionalPrice(prices=gp_types.ModelPrice(input_mtok=Decimal(1))),
            gp_types.ConditionalPrice(
                constraint=gp_types.StartDateConstraint(start_date=date(2027, 1, 1)),
                prices=gp_types.ModelPrice(input_mtok=Decimal(2)),
            ),
        ]
    )
    monkeypatch.setattr(pricing, "_lookup_model", lambda provider_id, model_ref: model)
    change = datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    now = [change - 1]
    prices = PriceBook([], None, clock=lambda: now[0])

    before = prices.price("p", "m")
    now[0] = change
    after = prices.price("p", "m")

    assert before is not None
    assert after is not None
    assert (before.input, after.input) == (1_000_000, 2_000_000)


def test_time_of_day_prices_charge_the_highest_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    off_peak = gp_types.ModelPrice(input_mtok=Decimal("0.1"), output_mtok=Decimal("1"))
    peak = gp_types.ModelPrice(input_mtok=Decimal("0.2"), output_mtok=Decimal("0.5"))
    model = synthetic_model(
        [
            gp_types.ConditionalPrice(prices=off_peak),
            gp_types.ConditionalPrice(
                constraint=gp_types.TimeOfDateConstraint(
                    start_time=time(0, 30, tzinfo=UTC), end_time=time(16, 30, tzinfo=UTC)
                ),
                prices=peak,
            ),
        ]
    )
    monkeypatch.setattr(pricing, "_lookup_model", lambda provider_id, model_ref: model)

    price = book().price("p", "m")

    assert price is not None
    assert (price.input, price.output) == (200_000, 1_000_000)


def test_lookups_never_open_a_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pricing tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    prices = book()

    assert prices.price("anthropic", "claude-opus-4-7") is not None
    assert prices.price("openai", "unheard-of-model") is None


def test_input_estimate_for_openai_chat() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "x" * 400},
            {"role": "user", "content": [{"type": "text", "text": "y" * 800}]},
        ],
    }

    # Every string counts, role and part type names included: 6 + 400 + 4 + 4 + 800 bytes.
    assert estimate_input_tokens(body) == math.ceil(1_214 / 4) + 2 * 4 + 3


def test_input_estimate_counts_a_flat_amount_per_image() -> None:
    image = "data:image/png;base64," + "A" * 100_000
    with_image = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ]
    }
    without_image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}

    extra = estimate_input_tokens(with_image) - estimate_input_tokens(without_image)

    assert extra == pricing._TOKENS_PER_IMAGE


def test_input_estimate_for_responses_and_anthropic_bodies() -> None:
    responses = {"instructions": "a" * 40, "input": "b" * 400}
    responses_items = {
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "b" * 400}]},
            {"role": "user", "content": [{"type": "input_image", "image_url": "data:..."}]},
        ]
    }
    anthropic = {
        "system": [{"type": "text", "text": "s" * 400}],
        "messages": [
            {"role": "user", "content": "u" * 400},
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "data": "A" * 50_000}},
                ],
            },
        ],
    }

    assert estimate_input_tokens(responses) == (40 + 400) // 4 + 3
    assert estimate_input_tokens(responses_items) >= 100 + pricing._TOKENS_PER_IMAGE
    assert 200 + pricing._TOKENS_PER_IMAGE <= estimate_input_tokens(anthropic) < 20_000


def test_input_estimate_counts_non_ascii_text_generously() -> None:
    chinese = {"messages": [{"role": "user", "content": "你好" * 100}]}

    # 200 characters, close to 200 tokens in practice: 600 UTF-8 bytes give 150 + overhead.
    assert estimate_input_tokens(chinese) >= 150


def test_input_estimate_survives_deep_nesting_and_odd_values() -> None:
    deep: Any = "leaf"
    for _ in range(5_000):
        deep = [deep]

    assert estimate_input_tokens({"messages": deep}) >= 1
    assert estimate_input_tokens({"messages": [{"content": None}, 7, True]}) == 3 * 4 + 3
    assert estimate_input_tokens({}) == 3


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 60}, 60),
        ({"max_output_tokens": 70}, 70),
        ({"max_tokens": 0, "max_completion_tokens": 80}, 80),
        ({"max_tokens": True}, 1024),
        ({"max_tokens": "500"}, 1024),
        ({"max_tokens": -5}, 1024),
        ({"max_tokens": 1.5}, 1024),
        # A lenient provider reads 2000.0 as 2000: so does the reservation.
        ({"max_tokens": 2000.0}, 2000),
        ({"max_tokens": float("inf")}, 1024),
        ({}, 1024),
    ],
)
def test_requested_output_tokens(body: dict[str, Any], expected: int) -> None:
    assert requested_output_tokens(body, 1024) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, 1),
        ({"n": 4}, 4),
        ({"n": 2, "best_of": 5}, 5),
        ({"n": 3.0}, 3),
        ({"n": 0}, 1),
        ({"n": True}, 1),
        ({"n": "9"}, 1),
        ({"generationConfig": {"candidateCount": 8}}, 8),
        ({"generation_config": {"candidate_count": 2}}, 2),
    ],
)
def test_requested_choices(body: dict[str, Any], expected: int) -> None:
    assert requested_choices(body) == expected


def test_negative_override_price_fails_when_configured() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        priced("openai", "x", Decimal("-1"), Decimal("1"))


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("aws", "us.anthropic.claude-haiku-4-5-20251001-v1:0"),
        ("aws", "amazon.nova-lite-v1:0"),
        ("google", "gemini-2.5-flash"),
        ("azure", "gpt-4o-mini"),
    ],
)
def test_a_canonical_name_has_the_price_of_the_name_it_came_from(provider: str, model: str) -> None:
    # Budgets and charges use the canonical name; some genai-prices ids (Bedrock's
    # `regional.anthropic...`) do not match their own patterns.
    prices = PriceBook([], None)
    canonical = prices.canonical(provider, model)
    assert prices.price(provider, model) is not None
    assert prices.price(provider, canonical) == prices.price(provider, model)
