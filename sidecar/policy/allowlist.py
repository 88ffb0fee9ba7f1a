"""Per-group model allowlists: the first rule naming one of the caller's groups decides."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import translate


def compile_globs(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex for a list of globs (case-sensitive, like model ids); None matches nothing."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns))


@dataclass(frozen=True)
class AllowRule:
    groups: frozenset[str]
    allow: re.Pattern[str] | None
    deny: re.Pattern[str] | None


@dataclass(frozen=True)
class Allowlist:
    default_allow: bool
    rules: tuple[AllowRule, ...]

    def allows(self, groups: tuple[str, ...], model: str) -> bool:
        for rule in self.rules:
            if rule.groups.isdisjoint(groups):
                continue
            if rule.deny is not None and rule.deny.match(model):
                return False
            return rule.allow is not None and rule.allow.match(model) is not None
        return self.default_allow
