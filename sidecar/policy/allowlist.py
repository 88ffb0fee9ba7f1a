"""Per-group model allowlists: the first rule naming one of the caller's groups decides."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import translate


def compile_globs(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One case-insensitive regex for a list of globs; None matches nothing.

    Case-insensitive because providers treat model names so (`GPT-4O` is `gpt-4o`), and
    policy must not be the one place where a different spelling is a different model.
    """
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns), re.IGNORECASE)


@dataclass(frozen=True)
class AllowRule:
    groups: frozenset[str]
    allow: re.Pattern[str] | None
    deny: re.Pattern[str] | None


@dataclass(frozen=True)
class Allowlist:
    default_allow: bool
    rules: tuple[AllowRule, ...]

    def allows(self, groups: tuple[str, ...], model: str, canonical: str = "") -> bool:
        """Whether `model` (as requested) and `canonical` (the model the price book resolves
        it to) are both allowed: a deny pattern matching either name denies, and the allow
        patterns must admit each name, so no spelling of a model gets what another is
        refused."""
        requested = model.strip()
        names = (
            (requested,)
            if not canonical or canonical == requested.lower()
            else (requested, canonical)
        )
        for rule in self.rules:
            if rule.groups.isdisjoint(groups):
                continue
            deny, allow = rule.deny, rule.allow
            if deny is not None:
                for name in names:
                    if deny.match(name):
                        return False
            if allow is None:
                return False
            return all(allow.match(name) is not None for name in names)
        return self.default_allow
