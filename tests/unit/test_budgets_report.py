"""`sidecar budgets` text: reset times, the utilisation bar, and the table's columns."""

from __future__ import annotations

from decimal import Decimal

from sidecar.budget.explain import listed_models
from sidecar.client.budgets_report import bar, render_budgets, resets_in
from sidecar.policy.rules import compile_rule, literal_values
from sidecar.policy.windows import FixedWindow
from sidecar.store.budget_types import LedgerDims, LedgerRow

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def test_resets_in_reads_like_a_person_would_say_it() -> None:
    assert resets_in("2026-01-01T03:12:30Z", NOW) == "3h 12m"
    assert resets_in("2026-01-03T04:00:00Z", NOW) == "2d 4h"
    assert resets_in("2026-01-01T00:12:00Z", NOW) == "12m"
    assert resets_in("2026-01-01T00:00:45Z", NOW) == "45s"
    assert resets_in("2025-12-31T23:00:00Z", NOW) == "now"


def test_bar_fills_with_spend_and_caps_at_full() -> None:
    assert bar(Decimal("0.25"), Decimal("1")) == "[##........]   25%"
    assert bar(Decimal("3"), Decimal("1")) == "[##########]  300%"


def test_table_has_every_column_and_dollars() -> None:
    text = render_budgets(
        [
            {
                "rule": "per-user",
                "bucket": "user=a@x",
                "window": "fixed:daily:UTC",
                "spent": 0.5,
                "reserved": 0.1,
                "limit": 1,
                "remaining": 0.4,
                "resets_at": "2026-01-01T03:12:00Z",
            }
        ],
        NOW,
    )
    header, row = text.splitlines()
    assert header.split() == [
        "RULE",
        "BUCKET",
        "WINDOW",
        "SPENT",
        "RESERVED",
        "LIMIT",
        "REMAINING",
        "USED",
        "RESETS",
        "IN",
    ]
    assert "$0.500000" in row and "$1.000000" in row and "60%" in row and "3h 12m" in row
    assert "No budget applies" in render_budgets([], NOW)


def test_candidates_are_models_with_spend_and_plain_names_in_filters() -> None:
    rule = compile_rule(
        name="r",
        limit=1,
        window=FixedWindow("daily", "UTC"),
        filters={"model": ("gpt-4o", "claude-*")},
        split=("user",),
        action="block",
    )
    assert literal_values(rule, "model") == ("gpt-4o",)
    spent = LedgerRow(0, LedgerDims(model="o3", provider="openai"), 1, 1, 0, 0)
    assert listed_models([rule], [spent]) == [("gpt-4o", ""), ("o3", "openai")]


def test_token_and_request_rows_show_whole_numbers_in_their_unit() -> None:
    text = render_budgets(
        [
            {
                "rule": "tpm",
                "bucket": "token=bot",
                "window": "rolling:60",
                "unit": "tokens",
                "tokens": "output",
                "spent": 1500,
                "reserved": 500,
                "limit": 200000,
                "remaining": 198000,
                "resets_at": "2026-01-01T00:00:45Z",
            },
            {
                "rule": "rpm",
                "bucket": "(all)",
                "window": "rolling:60",
                "unit": "requests",
                "spent": 3,
                "reserved": 1,
                "limit": 4,
                "remaining": 0,
                "resets_at": "2026-01-01T00:00:45Z",
            },
        ],
        NOW,
    )
    _, tpm, rpm = text.splitlines()
    assert "tpm (output)" in tpm and "1,500 tok" in tpm and "200,000 tok" in tpm
    assert "$" not in tpm and "1%" in tpm
    assert "3 req" in rpm and "4 req" in rpm and "100%" in rpm
