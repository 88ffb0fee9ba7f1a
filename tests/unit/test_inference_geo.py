"""US-only inference costs more than the global rates genai-prices carries: Anthropic bills
`inference_geo: "us"` at 1.1x on every token category (Claude 4.6 and later) and reports
where the model ran in `usage.inference_geo`. Charged at the global rates, every call of a
caller asking for it (or of a workspace whose default it is) spent a tenth more than every
budget counted."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price

from sidecar.admission.estimate import requested_geo
from sidecar.metering.charge import Observed, bill
from sidecar.metering.parse import UsageMeter
from sidecar.model import TokenUsage, ToolFees
from sidecar.pricing import PriceBook, UnitPrice, estimate_micros, geo_surcharge, in_geo
from tests.support.meters import meter_json, meter_stream, observed

MODEL = "claude-opus-4-6"
BOOK = PriceBook([], None)


def price(model: str = MODEL) -> UnitPrice:
    found = BOOK.price("anthropic", model)
    assert found is not None
    return found


def price_of(model: str) -> UnitPrice | None:
    return BOOK.price("anthropic", model)


def usd(**usage: int) -> Decimal:
    return calc_price(Usage(**usage), MODEL, provider_id="anthropic").total_price


def up(amount: Decimal) -> int:
    return int((amount * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


def json_meter(usage: dict[str, Any]) -> UsageMeter:
    return meter_json("anthropic_messages", {"model": MODEL, "usage": usage})


def stream_meter(events: list[dict[str, Any]], piece: int) -> UsageMeter:
    return meter_stream("anthropic_messages", events, piece)


USAGE = {
    "input_tokens": 12_345,
    "output_tokens": 2_345,
    "cache_read_input_tokens": 40_000,
    "cache_creation_input_tokens": 3_000,
}
# genai-prices counts cache tokens inside the input.
REFERENCE = usd(
    input_tokens=55_345, output_tokens=2_345, cache_read_tokens=40_000, cache_write_tokens=3_000
)


@pytest.mark.parametrize("geo", ["us", "US", " us "])
def test_a_us_only_response_is_charged_a_tenth_more_on_every_token_category(geo: str) -> None:
    meter = json_meter({**USAGE, "inference_geo": geo})
    assert meter.fees == ToolFees(inference_geo=geo)
    charge = bill(MODEL, price(), price_of, 0, observed(meter))
    assert charge.total == up(REFERENCE * Decimal("1.1"))
    assert charge.total > up(REFERENCE)


# "not_available": what recorded responses of Claude Sonnet 4.5 (no choice of geography) say.
@pytest.mark.parametrize("geo", ["global", "GLOBAL", "not_available", None, 7])
def test_a_global_or_unreported_geography_is_charged_the_global_rates(geo: object) -> None:
    usage = dict(USAGE) if geo is None else {**USAGE, "inference_geo": geo}
    meter = json_meter(usage)
    assert meter.fees.inference_geo == (geo if isinstance(geo, str) else "")
    assert bill(MODEL, price(), price_of, 0, observed(meter)).total == up(REFERENCE)


def test_a_geography_not_known_is_charged_as_the_dearest_known() -> None:
    assert geo_surcharge("eu") == geo_surcharge("us") == (11, 10)
    meter = json_meter({**USAGE, "inference_geo": "eu"})
    assert bill(MODEL, price(), price_of, 0, observed(meter)).total == up(
        REFERENCE * Decimal("1.1")
    )


def geo_stream(final: bool = True) -> list[dict[str, Any]]:
    # The geography in message_start; the final delta carries counts and searches only.
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                "model": MODEL,
                "usage": {"input_tokens": 12_345, "output_tokens": 1, "inference_geo": "us"},
            },
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Sunny, é"},
        },
    ]
    if final:
        events += [
            {
                "type": "message_delta",
                "usage": {
                    "output_tokens": 2_345,
                    "server_tool_use": {"web_search_requests": 3},
                },
            },
            {"type": "message_stop"},
        ]
    return events


@pytest.mark.parametrize("piece", [1, 7, 61, 100_000])
def test_a_streams_geography_survives_a_later_usage_without_it_however_chunked(piece: int) -> None:
    meter = stream_meter(geo_stream(), piece)
    assert meter.complete and meter.usage == TokenUsage(12_345, 2_345)
    assert meter.fees == ToolFees(web_searches=3, inference_geo="us")
    charge = bill(MODEL, price(), price_of, 0, observed(meter))
    tokens = usd(input_tokens=12_345, output_tokens=2_345) * Decimal("1.1")
    # Searches are billed per search, not per token: the geography leaves them as they are.
    assert charge.total == up(tokens + Decimal("0.03"))


def test_a_stream_cut_before_its_final_usage_is_charged_in_its_geography() -> None:
    meter = stream_meter(geo_stream(final=False), 5)
    assert not meter.complete and meter.fees.inference_geo == "us"
    charge = bill(MODEL, price(), price_of, 0, observed(meter))
    seen = max(1, -(-meter.output_bytes // 4))
    assert charge.total == up(usd(input_tokens=12_345, output_tokens=seen) * Decimal("1.1"))


def test_every_iteration_is_charged_in_the_responses_geography() -> None:
    usage = {
        "input_tokens": 23_000,
        "output_tokens": 1_000,
        "inference_geo": "us",
        "iterations": [
            {"type": "compaction", "input_tokens": 180_000, "output_tokens": 3_500},
            {"type": "message", "input_tokens": 23_000, "output_tokens": 1_000},
        ],
    }
    charge = bill(MODEL, price(), price_of, 0, observed(json_meter(usage)))
    steps = usd(input_tokens=180_000, output_tokens=3_500) + usd(
        input_tokens=23_000, output_tokens=1_000
    )
    # Each step rounded up to the pico-dollar on its own, then the sum to the µUSD.
    assert up(steps * Decimal("1.1")) <= charge.total <= up(steps * Decimal("1.1")) + 1
    assert charge.total > up(steps)


def test_a_response_without_usage_is_charged_what_was_reserved_whatever_its_geography() -> None:
    charge = bill(MODEL, price(), price_of, 777, Observed(None, fees=ToolFees(inference_geo="us")))
    assert charge.total == 777


def test_the_reservation_of_a_us_only_request_is_a_tenth_more() -> None:
    unit = price()
    standard = estimate_micros(unit, 1_000, 500)
    assert in_geo(standard, "us") == -(-standard * 11 // 10)
    assert in_geo(standard, "global") == in_geo(standard, "") == standard
    assert requested_geo({"inference_geo": "us"}) == "us"
    assert requested_geo({"inference_geo": ["us"]}) == requested_geo({}) == ""
