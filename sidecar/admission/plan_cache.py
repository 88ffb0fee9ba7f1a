"""Bucket plans kept per request context until a window boundary or a rule change.

Planning tries every rule on every check (filters, splits, window slots): tens of µs for a
policy of a few dozen rules. A plan depends only on the rules, the request's dimensions
(identity, model, provider, metadata) and which slot each window is in, so the same caller
asking for the same model gets the same plan until the earliest of its windows moves on.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from sidecar.policy.rules import Context, Rule
from sidecar.policy.windows import FixedWindow
from sidecar.shared_values import SharedValues

P = TypeVar("P")


# The dimension names of contexts seen, one tuple for every key with the same ones.
_dims: SharedValues[tuple[str, ...]] = SharedValues(1024)


def context_key(ctx: Context) -> Hashable:
    """The dimension names (one shared tuple), then each dimension's values: as exact as
    the context's items, without a (name, values) pair per dimension in every cached key
    (about 400 bytes a plan)."""
    return (_dims(tuple(ctx)), *ctx.values())


def validity(rules: Iterable[Rule], now: float) -> tuple[float, float]:
    """[from, until): while `now` stays in it, every rule's window is in the same slot."""
    start, end = float("-inf"), float("inf")
    for rule in rules:
        window = rule.window
        slot = window.slot(now)
        # A fixed window's slot lasts until it resets; a rolling one's for one slot length.
        nxt = (
            window.resets_at(now) if isinstance(window, FixedWindow) else slot + window.slot_seconds
        )
        start, end = max(start, slot), min(end, nxt)
    return start, end


class PlanCache(Generic[P]):
    """At most `max_entries` plans; all of them go when the rules they were made from do."""

    # About 2 KB a plan: 1,024 of them some 2 MB. A plan lives for one slot of its
    # shortest window, so more callers than this would have to ask within one slot to miss.
    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._rules: tuple[object, ...] = ()
        self._plans: dict[Hashable, tuple[P, float, float]] = {}

    def get(self, rules: tuple[object, ...], key: Hashable, now: float) -> P | None:
        if len(rules) != len(self._rules) or any(
            a is not b for a, b in zip(rules, self._rules, strict=True)
        ):
            # A reload or a runtime rule change: identity, not equality, says "same rules".
            self._rules = rules
            self._plans.clear()
            return None
        found = self._plans.get(key)
        if found is None:
            return None
        plan, start, end = found
        return plan if start <= now < end else None

    def put(self, key: Hashable, plan: P, start: float, end: float) -> None:
        if len(self._plans) >= self.max_entries:
            # Cheaper than LRU bookkeeping on every hit, and a full cache is rare: it takes
            # that many distinct (caller, model) pairs within one window slot.
            self._plans.clear()
        self._plans[key] = (plan, start, end)
