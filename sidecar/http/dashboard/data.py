"""What the dashboard shows, gathered from the store: ledger sums, budget buckets, refusals.

Spend comes from the hourly ledger through `sidecar.metering.ledger` — the functions behind
`GET /v1/usage` — over the same range, so the page and the API show the same numbers.

Buckets are keys computed per request, not a list kept anywhere, so the page finds them the
way requests do: every caller / model / provider combination in the ledger during the
rules' current windows is planned against the current rules, and each distinct bucket's
state is read. Rules that filter or split on `metadata.*` cannot be placed this way (the
ledger keeps no metadata) and are left out.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sidecar.admission.plan import Planned, context, merge, plan
from sidecar.audit import latest
from sidecar.budget.explain import bucket_view
from sidecar.budget.recent import recent
from sidecar.engine import Engine
from sidecar.metering.ledger import (
    Totals,
    UsageRow,
    Window,
    align_down,
    align_up,
    dimension_values,
    group_usage,
    hour_range,
    in_range,
)
from sidecar.model import Identity
from sidecar.money import micros_to_usd_str
from sidecar.policy.rules import Rule
from sidecar.store.budget_types import LedgerRow

CHART_DIMENSIONS = ("user", "group", "model", "provider")
TOP_SPENDERS = 10
MAX_BUCKETS = 60
RECENT = 30
AUDIT_ROWS = 10
# Budget windows longer than this (rare) are enumerated from their last 400 days only.
MAX_LOOKBACK = 400 * 86_400


@dataclass(frozen=True)
class Bucket:
    view: dict[str, Any]
    used: int  # spent + reserved, in the rule's measure (µUSD, tokens, requests)
    limit: int  # in the same measure
    alerts: tuple[int, ...]

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.limit if self.limit else 0.0


@dataclass
class Dashboard:
    window: Window
    start: int  # first ledger hour, inclusive
    end: int  # last ledger hour, exclusive
    now: int
    totals: Totals
    series: dict[str, list[UsageRow]]
    top_spenders: list[UsageRow]
    buckets: list[Bucket]
    hidden_buckets: int
    recent: list[dict[str, Any]] = field(default_factory=list)
    filters: dict[str, str] = field(default_factory=dict)
    audit: list[dict[str, Any]] = field(default_factory=list)

    def window_starts(self) -> list[int]:
        size = 3600 if self.window == "hour" else 86_400
        first = align_down(self.start, self.window)
        return list(range(first, align_up(self.end, self.window), size))


def _listed(rule: Rule) -> bool:
    if rule.name == "account" and rule.action == "monitor" and rule.limit == 0:
        return False  # the always-on account tracking, not a budget anyone set
    dims = {d for d, _ in rule.filters} | set(rule.split)
    return not any(d.startswith("metadata.") for d in dims)


def _identity(row: LedgerRow) -> Identity:
    dims = row.dims
    kind = dims.kind if dims.kind in ("user", "service", "cli") else "user"
    # `user` in the ledger is the identity's `user` value: email, else token name.
    return Identity(
        kind=kind,  # type: ignore[arg-type]
        subject=dims.user,
        email=dims.user,
        groups=dims.groups,
        token_name=dims.token,
    )


async def buckets(engine: Engine, now: float) -> tuple[list[Bucket], int]:
    """Every bucket with spend in its current window, fullest first; and how many more."""
    rules = [r for r in engine.rules(engine.holder.current) if _listed(r)]
    if not rules:
        return [], 0
    since = max(min(r.window.since(now) for r in rules), int(now) - MAX_LOOKBACK)
    first, last = hour_range(since, int(now) + 1)
    rows = in_range(await engine.store.ledger_rows(first, last), first, last)
    planned: dict[tuple[str, str], Planned] = {}
    for row in {row.dims: row for row in rows}.values():
        ctx = context(_identity(row), row.dims.model, row.dims.provider, {})
        for p in plan(rules, ctx, now):
            planned.setdefault((p.rule.name, p.view.key), p)
    if not planned:
        return [], 0
    budget = merge(list(planned.values()))
    states = await engine.store.bucket_states(list(budget.views), now)
    out = []
    for p in budget.planned:
        state = budget.state(p, states)
        used = state.spent + state.reserved
        if used:
            out.append(Bucket(bucket_view(p, state, now), used, p.rule.limit, p.rule.alerts))
    out.sort(
        key=lambda b: (
            -(b.used / b.limit) if b.limit else 0,
            -b.used,
            b.view["rule"],
            b.view["bucket"],
        )
    )
    return out[:MAX_BUCKETS], max(0, len(out) - MAX_BUCKETS)


def totals_of(rows: Sequence[LedgerRow]) -> Totals:
    grouped = group_usage(rows, ())
    return grouped[0].totals if grouped else Totals()


def matching(rows: Sequence[LedgerRow], filters: Mapping[str, str]) -> list[LedgerRow]:
    """Rows whose user, model (exact) and groups (one of them) match every filter."""
    return [
        row
        for row in rows
        if all(value in dimension_values(row.dims, dim) for dim, value in filters.items())
    ]


async def _rows(
    engine: Engine, start: int, end: int, filters: Mapping[str, str]
) -> tuple[int, int, list[LedgerRow]]:
    first, last = hour_range(start, end)
    rows = in_range(await engine.store.ledger_rows(first, last), first, last)
    return first, last, matching(rows, filters)


CSV_KEYS = ("user", "model", "provider")


async def export_csv(
    engine: Engine, window: Window, start: int, end: int, filters: Mapping[str, str]
) -> str:
    """The page's spend as CSV: one line per window, user, model and provider."""
    _, _, rows = await _rows(engine, start, end, filters)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["window_start", *CSV_KEYS, "cost_usd", "requests", "input_tokens", "output_tokens"]
    )
    for row in group_usage(rows, CSV_KEYS, window):
        keys = dict(row.keys)
        t = row.totals
        start_text = datetime.fromtimestamp(row.window_start or 0, UTC).isoformat()
        writer.writerow(
            [
                start_text.replace("+00:00", "Z"),
                *(keys[k] for k in CSV_KEYS),
                micros_to_usd_str(t.cost),
                t.requests,
                t.input_tokens,
                t.output_tokens,
            ]
        )
    return out.getvalue()


async def gather(
    engine: Engine, window: Window, start: int, end: int, filters: Mapping[str, str] | None = None
) -> Dashboard:
    """The page's data for ledger hours covering [start, end), for the rows that match
    `filters` (budgets and refusals are never filtered: they are the current state)."""
    now = int(engine.clock())
    first, last, rows = await _rows(engine, start, end, filters or {})
    series = {dim: group_usage(rows, (dim,), window) for dim in CHART_DIMENSIONS}
    found, hidden = await buckets(engine, now)
    return Dashboard(
        window=window,
        start=first,
        end=last,
        now=now,
        totals=totals_of(rows),
        series=series,
        top_spenders=group_usage(rows, ("user",))[:TOP_SPENDERS],
        buckets=found,
        hidden_buckets=hidden,
        recent=await recent(engine.store, RECENT, now=now),
        filters=dict(filters or {}),
        audit=await latest(engine.store, AUDIT_ROWS, now=now),
    )
