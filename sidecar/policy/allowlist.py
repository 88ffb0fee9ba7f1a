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
        names = (model.strip(), canonical) if canonical else (model.strip(),)
        for rule in self.rules:
            if rule.groups.isdisjoint(groups):
                continue
            if rule.deny is not None and any(rule.deny.match(n) for n in names):
                return False
            return rule.allow is not None and all(rule.allow.match(n) for n in names)
        return self.default_allow
