"""A new rule counts the spend already made in its window: its buckets are seeded once from
the hourly ledger before the rule takes effect.

Precision is the ledger's: an hour. The hour in which a window starts is counted whole
(erring towards the budget, never past it). Rules that filter or split on `metadata.*`
cannot be seeded (the ledger does not keep client metadata) and start counting when they
are created; so do rules over a rolling window shorter than an hour (a requests- or
tokens-per-minute limit: an hour of usage poured into one minute would refuse everything
for that minute), and so does spend committed in the second it takes a new rule to reach
every replica.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

import structlog

from sidecar.policy.rules import Rule
from sidecar.policy.windows import RollingWindow
from sidecar.store.base import BudgetStore, Ledger
from sidecar.store.budget_types import BucketView, LedgerRow, measured

log = structlog.get_logger("sidecar.backfill")
_HOUR = 3600


def marker(rule: Rule) -> str:
    """Names the rule's buckets: the same name, window and split share their spend."""
    raw = f"{rule.name}|{rule.window_label}|{','.join(rule.split)}"
    if rule.measure != "usd":
        raw += f"|{rule.measure}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def seedable(rule: Rule) -> bool:
    dims = {d for d, _ in rule.filters} | set(rule.split)
    # The account rules track from the first request on and need no seeding.
    if rule.name == "account" or any(d.startswith("metadata.") for d in dims):
        return False
    # The ledger's precision is an hour: too coarse for a shorter window.
    return not (isinstance(rule.window, RollingWindow) and rule.window.seconds < _HOUR)


def seed_amounts(rule: Rule, rows: Sequence[LedgerRow], now: float) -> list[tuple[BucketView, int]]:
    since = rule.window.since(now)
    totals: dict[tuple[str, int], int] = defaultdict(int)
    for row in rows:
        # What the row amounts to in the rule's measure: cost, tokens or requests.
        amount = (
            measured(rule.measure, row.cost, row.input_tokens, row.output_tokens)
            if rule.measure != "requests"
            else row.requests
        )
        if row.hour + _HOUR <= since or amount <= 0:
            continue
        d = row.dims
        ctx = {
            "user": (d.user,),
            "group": d.groups,
            "token": (d.token,) if d.token else (),
            "kind": (d.kind,),
            "model": (d.model,),
            "provider": (d.provider,),
        }
        slot = rule.window.slot(max(row.hour, since))
        for key, _ in rule.buckets(ctx):
            totals[(key, slot)] += amount
    ttl = rule.window.ttl_seconds()
    return [
        (BucketView(key, slot, since, ttl, rule.limit, measure=rule.measure), amount)
        for (key, slot), amount in sorted(totals.items())
    ]


class SpendStore(BudgetStore, Ledger, Protocol):
    """Seeding reads the ledger and writes budget slots."""


async def seed_rules(store: SpendStore, rules: Sequence[Rule], now: float) -> int:
    """Seed every seedable rule not seeded before; returns how many were seeded now."""
    seeded = 0
    candidates = [r for r in rules if seedable(r)]
    if not candidates:
        return 0
    # One ledger read covers the longest window among them.
    start = min(r.window.since(now) for r in candidates) // _HOUR * _HOUR
    rows = await store.ledger_rows(start, int(now) // _HOUR * _HOUR + _HOUR)
    for rule in candidates:
        spend = seed_amounts(rule, rows, now)
        if await store.add_spend(marker(rule), spend):
            seeded += 1
            if spend:
                log.info(
                    "rule_seeded_from_ledger",
                    rule=rule.name,
                    buckets=len(spend),
                    measure=rule.measure,
                    amount=sum(a for _, a in spend),
                )
    return seeded
