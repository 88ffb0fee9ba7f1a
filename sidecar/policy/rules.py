"""Spend rules compiled for the hot path: filter/split over request dimensions → buckets.

A rule limits one measure: µUSD, tokens (input + output, or one of them) or requests. A
rule limiting input and output tokens separately compiles to two rules of one name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from sidecar.money import micros_to_usd
from sidecar.policy.allowlist import compile_globs
from sidecar.policy.windows import FixedWindow, RollingWindow
from sidecar.store.budget_types import Measure

Action = Literal["block", "fallback", "monitor"]
Unit = Literal["usd", "tokens", "requests"]
UNIT_OF: Mapping[Measure, Unit] = {
    "usd": "usd",
    "tokens": "tokens",
    "input_tokens": "tokens",
    "output_tokens": "tokens",
    "requests": "requests",
}
Window = FixedWindow | RollingWindow
# Dimension values of one request; `group` is multi-valued, everything else single.
Context = Mapping[str, tuple[str, ...]]
# Values a filter also tries, but a split never uses: a rule about `gpt-4o` applies to a
# request for `GPT-4O-2024-08-06` whichever name its filter was written with, while the
# request's bucket is the canonical model's alone.
FILTER_ALIASES: Mapping[str, str] = {"model": "requested_model"}
# The labels of a rule's one bucket when it has no split: shared by every plan (a cached
# plan per caller would otherwise hold an empty dict per such rule).
_NO_LABELS: Mapping[str, str] = MappingProxyType({})


def in_unit(unit: Unit, amount: int) -> float | int:
    """An amount as the API shows it: USD for µUSD, whole tokens or requests otherwise."""
    return micros_to_usd(amount) if unit == "usd" else amount


@dataclass(frozen=True)
class Rule:
    name: str
    limit: int  # in the rule's measure: µUSD, tokens or requests
    window: Window
    window_label: str
    filters: tuple[tuple[str, re.Pattern[str]], ...]
    split: tuple[str, ...]
    action: Action
    alerts: tuple[int, ...]
    source: Literal["file", "runtime"] = "file"
    # The filters as written (globs), for views that list a rule's buckets without a request.
    patterns: tuple[tuple[str, tuple[str, ...]], ...] = ()
    measure: Measure = "usd"
    # Derived once here rather than on every request (every rule is tried on every check).
    _prefix: str = field(init=False, repr=False, compare=False)
    _narrow: Mapping[str, re.Pattern[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # µUSD buckets keep the keys they had before rules had units.
        suffix = "" if self.measure == "usd" else f"|{self.measure}"
        object.__setattr__(self, "_prefix", f"{self.name}|{self.window_label}{suffix}")
        object.__setattr__(self, "_narrow", dict(self.filters))

    @property
    def unit(self) -> Unit:
        return UNIT_OF[self.measure]

    def buckets(self, ctx: Context) -> list[tuple[str, Mapping[str, str]]]:
        """(bucket key, split labels) for each bucket this request falls in; [] if none."""
        for dim, pattern in self.filters:
            match = pattern.match
            alias = FILTER_ALIASES.get(dim)
            values = ctx.get(dim, ())
            if alias is not None:
                values = (*values, *ctx.get(alias, ()))
            for value in values:
                if match(value):
                    break
            else:
                return []
        if not self.split:
            return [(self._prefix, _NO_LABELS)]
        combos: list[dict[str, str]] = [{}]
        for dim in self.split:
            values = ctx.get(dim, ())
            narrow = self._narrow.get(dim)
            if narrow is not None:
                values = tuple(v for v in values if narrow.match(v))
            # A request without a value for a split dimension shares the "" bucket.
            values = tuple(dict.fromkeys(values)) or ("",)
            combos = [{**c, dim: v} for c in combos for v in values]
        prefix = self._prefix
        return [(prefix + "".join(f"|{d}={c[d]}" for d in self.split), c) for c in combos]


def compile_rule(
    *,
    name: str,
    limit: int,
    window: Window,
    filters: Mapping[str, tuple[str, ...]],
    split: tuple[str, ...],
    action: Action,
    alerts: tuple[int, ...] = (),
    source: Literal["file", "runtime"] = "file",
    measure: Measure = "usd",
) -> Rule:
    compiled = []
    for dim, patterns in filters.items():
        pattern = compile_globs(tuple(patterns))
        # An empty filter list matches nothing, which is what the operator wrote.
        compiled.append((dim, pattern if pattern is not None else re.compile(r"(?!)")))
    if isinstance(window, FixedWindow):
        label = f"fixed:{window.period}:{window.timezone}"
    else:
        label = f"rolling:{window.seconds}"
    return Rule(
        name,
        limit,
        window,
        label,
        tuple(compiled),
        split,
        action,
        tuple(sorted(alerts)),
        source,
        tuple((dim, tuple(patterns)) for dim, patterns in filters.items()),
        measure,
    )


def literal_values(rule: Rule, dimension: str) -> tuple[str, ...]:
    """The plain names (no glob characters) a rule's filter lists for one dimension."""
    for dim, patterns in rule.patterns:
        if dim == dimension:
            return tuple(p for p in patterns if not any(c in p for c in "*?[]"))
    return ()
