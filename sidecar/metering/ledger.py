"""Usage reports from the hourly ledger: group-by rows and time buckets, summed in µUSD.

Pure functions over `LedgerRow`s; the HTTP layer reads the rows and converts the integer
sums to dollars only when it renders JSON. Ledger rows are hourly (UTC), so an `hour` window
is one row's hour and a `day` window is the UTC day holding it.

A row belongs to the hour its request was admitted in, whenever it was charged: a late
completion that corrects an expired reservation's estimate lands in the same hour, so a
bucket's total is what its requests finally cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from sidecar.store.budget_types import LedgerDims, LedgerRow

Window = Literal["hour", "day"]
WINDOWS: tuple[Window, ...] = ("hour", "day")
WINDOW_SECONDS: dict[Window, int] = {"hour": 3600, "day": 86400}
HOUR = 3600
DIMENSIONS: tuple[str, ...] = ("user", "group", "token", "kind", "model", "provider")


@dataclass(frozen=True, slots=True)
class Totals:
    cost: int = 0  # µUSD
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    # Requests answered with a provider error (included in `requests`).
    errors: int = 0

    def plus(self, row: LedgerRow) -> Totals:
        return Totals(
            self.cost + row.cost,
            self.requests + row.requests,
            self.input_tokens + row.input_tokens,
            self.output_tokens + row.output_tokens,
            self.errors + row.errors,
        )


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group: its dimension values (in group-by order), its window and its totals."""

    keys: tuple[tuple[str, str], ...]
    window_start: int | None
    totals: Totals


@dataclass(frozen=True, slots=True)
class HistoryBucket:
    start: int  # Unix seconds, inclusive
    end: int  # Unix seconds, exclusive
    cost: int  # µUSD


def parse_group_by(text: str) -> tuple[str, ...]:
    """`user,model` → ('user', 'model'); ValueError naming any unknown dimension."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in DIMENSIONS]
    if unknown:
        raise ValueError(
            f"unknown dimension(s) {', '.join(unknown)}; choose from {', '.join(DIMENSIONS)}"
        )
    return names


def align_down(ts: int, window: Window) -> int:
    size = WINDOW_SECONDS[window]
    return ts - ts % size


def align_up(ts: int, window: Window) -> int:
    size = WINDOW_SECONDS[window]
    return -(-ts // size) * size


def hour_range(start: int, end: int) -> tuple[int, int]:
    """The ledger hours [first, last) that cover the instants [start, end)."""
    return align_down(start, "hour"), align_up(end, "hour")


def dimension_values(dims: LedgerDims, dimension: str) -> tuple[str, ...]:
    """A row's values for one dimension. Groups are multi-valued: the row counts once in each
    of its groups; a caller without groups (or token) has the empty value."""
    if dimension == "group":
        return tuple(dict.fromkeys(dims.groups)) or ("",)
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown dimension {dimension!r}")
    value: str = getattr(dims, dimension)
    return (value,)


def _combinations(dims: LedgerDims, group_by: Sequence[str]) -> list[tuple[tuple[str, str], ...]]:
    combos: list[tuple[tuple[str, str], ...]] = [()]
    for dimension in group_by:
        values = dimension_values(dims, dimension)
        combos = [(*combo, (dimension, value)) for combo in combos for value in values]
    return combos


def group_usage(
    rows: Iterable[LedgerRow], group_by: Sequence[str], window: Window | None = None
) -> list[UsageRow]:
    """Sum rows per distinct combination of `group_by` values (and per window, if given).

    Ordered by window start, then cost (highest first), then the key values. Grouping by
    `group` counts a caller in several groups once in each, so such rows add up to more
    than the total.
    """
    sums: dict[tuple[int | None, tuple[tuple[str, str], ...]], Totals] = {}
    for row in rows:
        start = align_down(row.hour, window) if window else None
        for keys in _combinations(row.dims, group_by):
            slot = (start, keys)
            sums[slot] = sums.get(slot, Totals()).plus(row)
    ordered = sorted(sums.items(), key=lambda item: (item[0][0] or 0, -item[1].cost, item[0][1]))
    return [UsageRow(keys, start, totals) for (start, keys), totals in ordered]


def usage_history(rows: Iterable[LedgerRow], window: Window) -> list[HistoryBucket]:
    """Spend per window, oldest first; windows without any ledger row are left out."""
    sums: dict[int, int] = {}
    for row in rows:
        start = align_down(row.hour, window)
        sums[start] = sums.get(start, 0) + row.cost
    size = WINDOW_SECONDS[window]
    return [HistoryBucket(start, start + size, cost) for start, cost in sorted(sums.items())]


def of_user(rows: Iterable[LedgerRow], user: str) -> list[LedgerRow]:
    """One caller's rows: the `user` dimension is the email of a person (whatever the kind
    of their token) or the name of a service token, which can never contain an '@'."""
    return [row for row in rows if row.dims.user == user]


def in_range(rows: Iterable[LedgerRow], start: int, end: int) -> list[LedgerRow]:
    """Rows whose hour starts within [start, end)."""
    return [row for row in rows if start <= row.hour < end]
