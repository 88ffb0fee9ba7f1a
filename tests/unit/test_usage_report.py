"""`sidecar usage` rendering: relative --since, exact totals, aligned columns."""

from __future__ import annotations

from decimal import Decimal

from sidecar.client.usage_report import render_table, since_param, total

ROWS = [
    {
        "user": "alice@example.com",
        "model": "gpt-4o-mini",
        "cost_usd": 0.1,
        "requests": 3,
        "input_tokens": 1200,
        "output_tokens": 80,
    },
    {
        "user": "ci-bot",
        "model": "claude-haiku-4-5",
        "cost_usd": 0.2,
        "requests": 1,
        "input_tokens": 5,
        "output_tokens": 700,
        "errors": 2,
    },
    {
        "user": "",
        "model": "gpt-4o-mini",
        "cost_usd": 0.000001,
        "requests": 1,
        "input_tokens": 0,
        "output_tokens": 0,
    },
]


def test_since_durations_become_epoch_seconds_and_the_rest_passes_through() -> None:
    assert since_param("24h", 1_000_000) == str(1_000_000 - 86_400)
    assert since_param("7d", 1_000_000) == str(1_000_000 - 7 * 86_400)
    assert since_param("2024-05-01T00:00:00Z", 0) == "2024-05-01T00:00:00Z"
    assert since_param("1714521600", 0) == "1714521600"


def test_total_is_an_exact_decimal_sum() -> None:
    grand = total(ROWS)
    # 0.1 + 0.2 in floats is 0.30000000000000004; in the table it is exact.
    assert grand["cost_usd"] == Decimal("0.300001")
    assert (grand["requests"], grand["input_tokens"], grand["output_tokens"]) == (5, 1205, 780)


def test_table_is_aligned_with_a_total_line() -> None:
    lines = render_table(ROWS, ["user", "model"], total(ROWS)).splitlines()
    assert lines[0].split() == [
        "USER",
        "MODEL",
        "COST_USD",
        "REQUESTS",
        "INPUT",
        "OUTPUT",
        "ERRORS",
    ]
    # A row without `errors` (an older server) shows 0.
    assert lines[1].split() == [
        "alice@example.com",
        "gpt-4o-mini",
        "0.100000",
        "3",
        "1200",
        "80",
        "0",
    ]
    assert lines[3].split()[0] == "-"  # no user recorded
    assert len({len(line) for line in lines[:4]}) == 1
    assert lines[-1].split() == ["TOTAL", "0.300001", "5", "1205", "780", "2"]
    # Numbers are right-aligned under their headers.
    assert lines[1].index("0.100000") + len("0.100000") == lines[0].index("COST_USD") + 8


def test_empty_table_says_so() -> None:
    text = render_table([], ["user"], total([]))
    assert "(no usage in this range)" in text
    assert text.splitlines()[-1].split() == ["TOTAL", "0.000000", "0", "0", "0", "0"]
