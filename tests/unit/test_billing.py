"""What a response costs beyond its top-level tokens: Anthropic iterations, 1-hour cache
writes, server-tool fees. Expectations come from genai-prices' `calc_price`.

Payloads marked "documented shape" follow Anthropic's and OpenAI's documentation examples;
the recorded ones are in tests/fixtures/recorded/ and replayed through Envoy by
tests/integration/test_recorded_billing.py.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price

from sidecar.metering.charge import Observed, Part, bill
from sidecar.model import Iteration, TokenUsage, ToolFees
from sidecar.pricing import PriceBook, UnitPrice
from tests.support.meters import meter_json, meter_stream, observed

BOOK = PriceBook([], None)


def price(model: str, provider: str = "anthropic") -> UnitPrice:
    found = BOOK.price(provider, model)
    assert found is not None
    return found


def price_of(model: str) -> UnitPrice | None:
    return BOOK.price("anthropic", model)


def usd(model: str, provider: str = "anthropic", **usage: int) -> Decimal:
    return calc_price(Usage(**usage), model, provider_id=provider).total_price


def up(amount: Decimal) -> int:
    return int((amount * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


def down(amount: Decimal) -> int:
    return int((amount * 1_000_000).to_integral_value(rounding=ROUND_FLOOR))


# Documented shape: Anthropic's compaction page ("Understanding usage").
COMPACTION_USAGE = {
    "input_tokens": 23000,
    "output_tokens": 1000,
    "iterations": [
        {"type": "compaction", "input_tokens": 180000, "output_tokens": 3500},
        {"type": "message", "input_tokens": 23000, "output_tokens": 1000},
    ],
}


def test_compaction_iteration_is_billed_on_top_of_the_top_level_usage() -> None:
    meter = meter_json(
        "anthropic_messages", {"model": "claude-opus-4-6", "usage": COMPACTION_USAGE}
    )
    assert meter.iterations == (
        Iteration("compaction", TokenUsage(180000, 3500)),
        Iteration("message", TokenUsage(23000, 1000)),
    )
    charge = bill("claude-opus-4-6", price("claude-opus-4-6"), price_of, 0, observed(meter))
    # Each step is its own sampling call: each is priced (and tiered) on its own.
    want = up(
        usd("claude-opus-4-6", input_tokens=180000, output_tokens=3500)
        + usd("claude-opus-4-6", input_tokens=23000, output_tokens=1000)
    )
    top_level_only = up(usd("claude-opus-4-6", input_tokens=23000, output_tokens=1000))
    assert charge.total == want and want > top_level_only * 5
    assert charge.tokens == TokenUsage(203000, 4500) and charge.others == ()


def compaction_stream() -> list[dict[str, Any]]:
    # The shape of vercel/ai's recorded compaction stream: message_start carries the
    # compaction step's input, the final message_delta the message's and the iterations.
    return [
        {
            "type": "message_start",
            "message": {
                "model": "claude-opus-4-6",
                "usage": {"input_tokens": 60385, "output_tokens": 5},
            },
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Based on our conversation, é"},
        },
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {
                "input_tokens": 612,
                "output_tokens": 2819,
                "server_tool_use": {"web_search_requests": 0},
                "iterations": [
                    {"type": "compaction", "input_tokens": 60385, "output_tokens": 522},
                    {"type": "message", "input_tokens": 612, "output_tokens": 2819},
                ],
            },
        },
        {"type": "message_stop"},
    ]


@pytest.mark.parametrize("piece", [1, 2, 7, 61, 100_000])
def test_compaction_stream_is_billed_from_its_iterations_however_it_is_chunked(piece: int) -> None:
    meter = meter_stream("anthropic_messages", compaction_stream(), piece)
    assert meter.complete and meter.usage == TokenUsage(612, 2819)
    charge = bill("claude-opus-4-6", price("claude-opus-4-6"), price_of, 0, observed(meter))
    assert charge.total == up(
        usd("claude-opus-4-6", input_tokens=60385, output_tokens=522)
        + usd("claude-opus-4-6", input_tokens=612, output_tokens=2819)
    )


def advisor_usage() -> dict[str, Any]:
    # vercel/ai's recorded advisor response (anthropic-advisor-20260301.1.json).
    return {
        "input_tokens": 2414,
        "output_tokens": 3200,
        "iterations": [
            {"type": "message", "input_tokens": 1051, "output_tokens": 35},
            {
                "type": "advisor_message",
                "model": "claude-opus-4-7",
                "input_tokens": 2728,
                "output_tokens": 874,
            },
            {"type": "message", "input_tokens": 1363, "output_tokens": 3165},
        ],
    }


def test_advisor_iterations_are_billed_at_the_advisor_model_and_booked_under_it() -> None:
    meter = meter_json("anthropic_messages", {"usage": advisor_usage()})
    charge = bill("claude-sonnet-4-6", price("claude-sonnet-4-6"), price_of, 0, observed(meter))
    executor = usd("claude-sonnet-4-6", input_tokens=1051, output_tokens=35) + usd(
        "claude-sonnet-4-6", input_tokens=1363, output_tokens=3165
    )
    advisor = usd("claude-opus-4-7", input_tokens=2728, output_tokens=874)
    assert charge.total == up(executor + advisor)
    assert charge.others == (Part("claude-opus-4-7", down(advisor), TokenUsage(2728, 874)),)
    assert charge.tokens == TokenUsage(2414, 3200)
    # The request's model keeps the rest: its own cost, plus at most the rounding.
    assert charge.total - charge.others[0].cost in (up(executor), up(executor) + 1)


def test_an_iteration_of_an_unknown_type_is_charged_and_reported() -> None:
    usage = {
        "input_tokens": 10,
        "output_tokens": 5,
        "iterations": [
            {"type": "message", "input_tokens": 10, "output_tokens": 5},
            {"type": "reflection", "input_tokens": 400, "output_tokens": 70},
        ],
    }
    meter = meter_json("anthropic_messages", {"usage": usage})
    charge = bill("claude-haiku-4-5", price("claude-haiku-4-5"), price_of, 0, observed(meter))
    assert charge.unknown_kinds == ("reflection",)
    assert charge.total == up(
        usd("claude-haiku-4-5", input_tokens=10, output_tokens=5)
        + usd("claude-haiku-4-5", input_tokens=400, output_tokens=70)
    )


def test_an_iteration_naming_an_unpriced_model_is_charged_at_the_request_model() -> None:
    steps = (Iteration("advisor_message", TokenUsage(1000, 100), "no-such-model"),)
    charge = bill(
        "claude-haiku-4-5",
        price("claude-haiku-4-5"),
        price_of,
        0,
        Observed(TokenUsage(), True, iterations=steps),
    )
    assert charge.unpriced_models == ("no-such-model",) and charge.others == ()
    assert charge.total == up(usd("claude-haiku-4-5", input_tokens=1000, output_tokens=100))


def test_iterations_without_counts_cannot_hide_the_top_level_usage() -> None:
    usage = {
        "input_tokens": 5000,
        "output_tokens": 700,
        "iterations": [{"type": "message"}, {"type": "compaction"}],
    }
    meter = meter_json("anthropic_messages", {"usage": usage})
    charge = bill("claude-haiku-4-5", price("claude-haiku-4-5"), price_of, 0, observed(meter))
    assert charge.total == up(usd("claude-haiku-4-5", input_tokens=5000, output_tokens=700))


def test_one_hour_cache_writes_cost_the_one_hour_rate() -> None:
    # Documented shape: Messages usage with a cache_creation breakdown by TTL.
    usage = {
        "input_tokens": 50,
        "output_tokens": 20,
        "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
    }
    for meter in (
        meter_json("anthropic_messages", {"usage": usage}),
        meter_stream(
            "anthropic_messages",
            [
                {"type": "message_start", "message": {"usage": usage}},
                {"type": "message_delta", "usage": {"output_tokens": 20}},
                {"type": "message_stop"},
            ],
            13,
        ),
    ):
        assert meter.usage == TokenUsage(50, 20, 1000, 3000, 2000)
        charge = bill("claude-sonnet-4-6", price("claude-sonnet-4-6"), price_of, 0, observed(meter))
        assert charge.total == up(
            usd(
                "claude-sonnet-4-6",
                input_tokens=4050,
                output_tokens=20,
                cache_read_tokens=1000,
                cache_write_tokens=3000,
                cache_write_1h_tokens=2000,
            )
        )


def test_anthropic_web_searches_cost_ten_dollars_per_thousand() -> None:
    # The case: a stream with 10 searches was $0.10 short.
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 2037, "output_tokens": 1}}},
        {
            "type": "message_delta",
            "usage": {
                "input_tokens": 15665,
                "output_tokens": 795,
                "server_tool_use": {"web_search_requests": 10},
            },
        },
        {"type": "message_stop"},
    ]
    meter = meter_stream("anthropic_messages", events, 5)
    assert meter.fees == ToolFees(web_searches=10)
    model = "claude-sonnet-4-20250514"
    charge = bill(model, price(model), price_of, 0, observed(meter))
    tokens = up(usd(model, input_tokens=15665, output_tokens=795))
    assert charge.total == tokens + 100_000


def responses_body() -> dict[str, Any]:
    # Items as in vercel/ai's recorded web search response: one search, then two page
    # actions that OpenAI does not bill as searches; plus a file search.
    return {
        "model": "gpt-5-mini",
        "output": [
            {"type": "web_search_call", "id": "ws_1", "action": {"type": "search"}},
            {"type": "web_search_call", "id": "ws_2", "action": {"type": "open_page"}},
            {"type": "web_search_call", "id": "ws_3", "action": {"type": "find_in_page"}},
            {"type": "file_search_call", "id": "fs_1"},
            {"type": "message", "id": "msg_1", "content": []},
        ],
        "usage": {
            "input_tokens": 1000,
            "input_tokens_details": {"cached_tokens": 200},
            "output_tokens": 300,
        },
    }


def test_openai_responses_search_calls_carry_their_fees() -> None:
    meter = meter_json("openai_responses", responses_body())
    assert meter.fees == ToolFees(web_searches=1, file_searches=1)
    charge = bill("gpt-5-mini", price("gpt-5-mini", "openai"), price_of, 0, observed(meter))
    assert charge.total == up(
        usd(
            "gpt-5-mini",
            "openai",
            input_tokens=1000,
            cache_read_tokens=200,
            output_tokens=300,
            web_searches=1,
            storage_searches=1,
        )
    )


def test_openai_responses_stream_counts_searches_before_and_at_completion() -> None:
    body = responses_body()
    done = [
        {"type": "response.output_item.done", "output_index": i, "item": item}
        for i, item in enumerate(body["output"])
    ]
    completed = {"type": "response.completed", "response": body}
    cut = meter_stream("openai_responses", done[:1], 9)
    # Cut short after the first search: the search is still paid for.
    assert cut.fees == ToolFees(web_searches=1) and not cut.complete
    whole = meter_stream("openai_responses", [*done, completed], 9)
    assert whole.complete and whole.fees == ToolFees(web_searches=1, file_searches=1)
