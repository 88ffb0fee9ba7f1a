"""Budget utilisation for the metrics: per rule, the highest utilisation of any bucket and how
many buckets reached each alert threshold, from the states the store returns to decisions.

Buckets are never metric labels (one per user would be unbounded series); they are kept here,
per rule, and only the per-rule aggregates are exported. Each decision's reservation answer
already carries its buckets' store-wide spent + reserved, so no extra store call is made;
what one replica reports covers the buckets that replica's traffic touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sidecar.metrics import BUCKETS_AT_THRESHOLD, UTILISATION_MAX

if TYPE_CHECKING:
    from sidecar.admission.plan import Plan
    from sidecar.policy.rules import Rule
    from sidecar.store.budget_types import BucketState

# Buckets remembered per rule. Past this, the oldest observations give way: a memory bound
# for splits over very many users, at the price of undercounting beyond it.
MAX_BUCKETS_PER_RULE = 100_000
# Plans whose latest answer waits for the next refresh; past this many, all are folded in
# at once (a memory bound when very many callers are seen between two refreshes).
# A pending plan is held (and its states, a dozen per plan) past the plan cache's own
# bound: 64 keep that to about 0.2 MB (folding more often only when more callers than
# that are seen between two refreshes).
MAX_PENDING_PLANS = 64


# A bucket's observation is one int, `permille << _SLOT_BITS | slot` (a tuple of two ints
# was about 90 bytes more a bucket, and a split rule may hold 100,000 of them). Slots are
# Unix seconds: 36 bits last until the year 4147.
_SLOT_BITS = 36
_SLOT_MASK = (1 << _SLOT_BITS) - 1


@dataclass
class _RuleBuckets:
    rule: Rule
    # bucket key → per-mille of the limit used and the slot it was seen in (see _SLOT_BITS);
    # only buckets above zero: one at zero counts in no gauge.
    seen: dict[str, int] = field(default_factory=dict)


class Utilisation:
    def __init__(self, max_buckets: int = MAX_BUCKETS_PER_RULE) -> None:
        # Keyed by rule name and measure: a rule limiting input and output tokens apart is
        # two compiled rules of one name, and its gauges are the larger of the two.
        self._rules: dict[tuple[str, str], _RuleBuckets] = {}
        self._max = max_buckets
        self._exported: set[tuple[str, ...]] = set()
        # The latest answer per plan not folded in yet, by the plan's id (the plan is held).
        self._pending: dict[int, tuple[Plan, Sequence[BucketState]]] = {}

    def observe(self, budget: Plan, states: Sequence[BucketState]) -> None:
        """Note each planned bucket's spent + reserved as the store just reported it.

        Only a plan's latest answer matters, so it is held per plan and folded in at the
        next refresh (plans are cached per caller: a busy caller's buckets are folded once
        per refresh instead of once per Check). Plans are folded in the order of their
        latest answers, so a bucket two plans share ends with the later answer, as when
        each answer was folded at once.
        """
        key = id(budget)
        if self._pending.pop(key, None) is None and len(self._pending) >= MAX_PENDING_PLANS:
            self._fold()
        self._pending[key] = (budget, states)

    def _fold(self) -> None:
        pending, self._pending = self._pending, {}
        for budget, states in pending.values():
            self._note(budget, states)

    def _note(self, budget: Plan, states: Sequence[BucketState]) -> None:
        for planned in budget.planned:
            rule = planned.rule
            if rule.limit <= 0:
                continue
            state = budget.state(planned, states)
            permille = (state.spent + state.reserved) * 1000 // rule.limit
            entry = self._rules.get((rule.name, rule.measure))
            if entry is None or entry.rule is not rule:
                # New, or redefined by a reload: earlier observations were of another limit.
                entry = self._rules[(rule.name, rule.measure)] = _RuleBuckets(rule)
            seen = entry.seen
            key = planned.view.key
            if permille <= 0:
                # Nothing used (most buckets of a split over many users): no gauge counts
                # it, so it is not kept, and an earlier observation is replaced by nothing.
                seen.pop(key, None)
                continue
            if key not in seen and len(seen) >= self._max:
                del seen[next(iter(seen))]
            seen[key] = permille << _SLOT_BITS | (planned.view.slot & _SLOT_MASK)

    def refresh(self, rules: Sequence[Rule], now: float) -> None:
        """Set the gauges for the rules in force; buckets of past windows are dropped."""
        self._fold()
        exported: set[tuple[str, ...]] = set()
        by_name: dict[str, list[int]] = {}
        for rule in rules:
            entry = self._rules.get((rule.name, rule.measure))
            since = rule.window.since(now)
            values = by_name.setdefault(rule.name, [])
            if entry is not None:
                # A bucket not seen since the window's start has nothing in this window
                # that this process knows of.
                entry.seen = {k: v for k, v in entry.seen.items() if v & _SLOT_MASK >= since}
                values += [v >> _SLOT_BITS for v in entry.seen.values()]
            UTILISATION_MAX.labels(rule.name).set(max(values, default=0) / 1000)
            exported.add((rule.name,))
            for threshold in rule.alerts:
                count = sum(1 for v in values if v >= threshold * 10)
                BUCKETS_AT_THRESHOLD.labels(rule.name, str(threshold)).set(count)
                exported.add((rule.name, str(threshold)))
        for labels in self._exported - exported:
            # A rule removed by a reload stops being exported.
            gauge = UTILISATION_MAX if len(labels) == 1 else BUCKETS_AT_THRESHOLD
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        self._exported = exported
        for key in set(self._rules) - {(r.name, r.measure) for r in rules}:
            del self._rules[key]
