"""Ledger aggregation: grouping, exploding groups, windows and history buckets, in µUSD."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.metering.ledger import (
    DIMENSIONS,
    WINDOWS,
    HistoryBucket,
    Totals,
    Window,
    align_down,
    align_up,
    group_usage,
    hour_range,
    in_range,
    parse_group_by,
    usage_history,
)
from sidecar.store.budget_types import LedgerDims, LedgerRow

DAY = 86400
T0 = 1_714_521_600  # 2024-05-01T00:00:00Z

ALICE = LedgerDims("alice@example.com", ("ml", "eng"), "", "user", "gpt-4o-mini", "openai")
BOB = LedgerDims("bob@example.com", (), "", "user", "claude-haiku-4-5", "anthropic")
AGENT = LedgerDims("ci-bot", ("ml",), "ci-bot", "service", "gpt-4o-mini", "openai")


def row(
    hour: int, dims: LedgerDims, cost: int, requests: int = 1, inp: int = 10, out: int = 5
) -> LedgerRow:
    return LedgerRow(hour, dims, cost, requests, inp, out)


ROWS = [
    row(T0, ALICE, 100),
    row(T0 + 3600, ALICE, 7, inp=3, out=2),
    row(T0 + 3600, BOB, 250),
    row(T0 + DAY + 7200, AGENT, 41, requests=2),
]


def test_parse_group_by_keeps_order_and_drops_duplicates() -> None:
    assert parse_group_by("model, user,model") == ("model", "user")
    assert parse_group_by("") == ()
    assert set(DIMENSIONS) == {"user", "group", "token", "kind", "model", "provider"}


def test_parse_group_by_names_unknown_dimensions() -> None:
    with pytest.raises(ValueError, match="colour"):
        parse_group_by("user,colour")


def test_no_group_by_is_one_total_row() -> None:
    (total,) = group_usage(ROWS, ())
    assert total.keys == () and total.window_start is None
    assert total.totals == Totals(cost=398, requests=5, input_tokens=33, output_tokens=17)


def test_group_by_user_and_model_sums_integers() -> None:
    rows = group_usage(ROWS, ("user", "model"))
    assert [(dict(r.keys)["user"], r.totals.cost) for r in rows] == [
        ("bob@example.com", 250),
        ("alice@example.com", 107),
        ("ci-bot", 41),
    ]
    assert rows[1].totals == Totals(107, 2, 13, 7)


def test_groups_explode_into_one_row_per_group() -> None:
    rows = {dict(r.keys)["group"]: r.totals.cost for r in group_usage(ROWS, ("group",))}
    # alice counts in ml and eng, bob (no groups) under "", the agent in ml.
    assert rows == {"ml": 148, "eng": 107, "": 250}


def test_daily_window_buckets_rows_by_utc_day() -> None:
    rows = group_usage(ROWS, ("provider",), "day")
    assert [(r.window_start, dict(r.keys)["provider"], r.totals.cost) for r in rows] == [
        (T0, "anthropic", 250),
        (T0, "openai", 107),
        (T0 + DAY, "openai", 41),
    ]


def test_hourly_history_skips_empty_hours() -> None:
    assert usage_history(ROWS, "hour") == [
        HistoryBucket(T0, T0 + 3600, 100),
        HistoryBucket(T0 + 3600, T0 + 7200, 257),
        HistoryBucket(T0 + DAY + 7200, T0 + DAY + 10800, 41),
    ]


def test_late_correction_lands_in_the_same_bucket() -> None:
    # An expired reservation charged 500, then a late completion corrected it to 120.
    corrections = [row(T0, BOB, 500, inp=0, out=0), row(T0, BOB, -380, requests=0)]
    assert usage_history(corrections, "day") == [HistoryBucket(T0, T0 + DAY, 120)]
    (only,) = group_usage(corrections, ("user",))
    assert only.totals.requests == 1 and only.totals.cost == 120


def test_alignment_and_ranges() -> None:
    assert align_down(T0 + 5000, "hour") == T0 + 3600
    assert align_up(T0 + 5000, "hour") == T0 + 7200
    assert align_up(T0, "day") == T0
    assert align_down(T0 + DAY - 1, "day") == T0
    assert hour_range(T0 + 10, T0 + 3600) == (T0, T0 + 3600)
    assert in_range(ROWS, T0 + 3600, T0 + DAY) == ROWS[1:3]


@given(
    st.lists(
        st.tuples(
            st.integers(0, 24 * 40), st.sampled_from([ALICE, BOB, AGENT]), st.integers(-1000, 10**9)
        ),
        max_size=40,
    ),
    st.sampled_from(WINDOWS),
)
def test_history_and_grouping_conserve_the_total(
    entries: list[tuple[int, LedgerDims, int]], window: Window
) -> None:
    rows = [row(T0 + h * 3600, dims, cost) for h, dims, cost in entries]
    total = sum(cost for _, _, cost in entries)
    assert sum(b.cost for b in usage_history(rows, window)) == total
    for dims in (("user",), ("model", "provider"), ("kind", "token")):
        assert sum(r.totals.cost for r in group_usage(rows, dims, window)) == total
