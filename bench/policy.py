"""The realistic policy every sidecar row and microbenchmark runs: 20 spend rules, several of
which apply to the benchmark's caller, a model allowlist, a fallback chain and reserve
admission; plus the request that is sent.

Of the 20 file rules, 6 apply to the caller (`bench@example.com`, groups eng and ml, model
gpt-4o-mini at OpenAI): per user, per group (two buckets: one per group), per provider and
user, per model (rolling), per user and model (rolling) and an org-wide monitor. The other
14 are filtered on teams, models or kinds the caller is not. The six always-on account
tracking rules apply too, so each decision reserves in 13 buckets.

Budgets are large enough that nothing is refused during a run, and reservations live an
hour, so a row without metering never has expired reservations to settle mid-run.
"""

from __future__ import annotations

import json
from typing import Any

from devtools.config import demo_config
from devtools.keys import DevIssuer

USER = "bench@example.com"
GROUPS = ["eng", "ml"]
MODEL = "gpt-4o-mini"
PATH = "/openai/v1/chat/completions"
BODY = json.dumps(
    {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello in one word."},
        ],
    },
    separators=(",", ":"),
).encode()
BIG = 1_000_000  # USD: never reached during a benchmark


def _rule(name: str, window: dict[str, str], action: str = "block", **extra: Any) -> dict[str, Any]:
    return {"name": name, "budget_usd": BIG, "window": window, "action": action, **extra}


def spend_limits(teams: int = 10) -> list[dict[str, Any]]:
    """20 rules (with the default `teams`): 6 apply to the benchmark caller, the rest not."""
    applying = [
        _rule("per-user-daily", {"fixed": "daily"}, split=["user"]),
        _rule(
            "per-group-monthly",
            {"fixed": "monthly"},
            split=["group"],
            filter={"group": ["eng", "ml", "research"]},
        ),
        _rule(
            "openai-weekly-per-user",
            {"fixed": "weekly"},
            split=["user"],
            filter={"provider": ["openai"]},
        ),
        _rule(
            "mini-models-rolling",
            {"rolling": "1h"},
            "fallback",
            filter={"model": ["gpt-4o-mini*", "gpt-4.1-nano*"]},
        ),
        _rule(
            "user-model-24h",
            {"rolling": "24h"},
            split=["user", "model"],
            filter={"kind": ["user", "cli"]},
        ),
        _rule(
            "org-monitor",
            {"fixed": "daily", "timezone": "Europe/Paris"},
            "monitor",
            alerts=[50, 90, 100],
        ),
    ]
    others = [
        _rule(
            f"team-{i}-daily", {"fixed": "daily"}, split=["user"], filter={"group": [f"team-{i}"]}
        )
        for i in range(teams)
    ]
    others += [
        _rule("opus-daily", {"rolling": "24h"}, "fallback", filter={"model": ["claude-opus-*"]}),
        _rule(
            "agents-per-token", {"fixed": "daily"}, split=["token"], filter={"kind": ["service"]}
        ),
        _rule("workers-ai-weekly", {"fixed": "weekly"}, filter={"provider": ["workers-ai"]}),
        _rule(
            "interns-monthly", {"fixed": "monthly"}, split=["user"], filter={"group": ["interns"]}
        ),
    ]
    return applying + others


def bench_config(
    issuer: DevIssuer, jwks_path: str, store_url: str, rules: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return demo_config(
        issuer,
        jwks_path,
        store_url,
        spend_limits=spend_limits() if rules is None else rules,
        fallbacks={MODEL: [{"model": "gpt-4.1-nano", "provider": "openai"}]},
        models={
            "default": "deny",
            "rules": [
                {"groups": ["interns"], "allow": ["gpt-4o-mini"]},
                {"groups": ["contractors"], "deny": ["*opus*"], "allow": ["*"]},
                {
                    "groups": ["eng", "ml"],
                    "deny": ["o1-pro*"],
                    "allow": ["gpt-*", "claude-*", "o*"],
                },
            ],
        },
        admission={"mode": "reserve", "reservation_ttl": "1h"},
    )


def token(issuer: DevIssuer, email: str = USER, ttl: int = 6 * 3600) -> str:
    return issuer.mint(email, GROUPS, ttl=ttl)
