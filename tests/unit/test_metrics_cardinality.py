"""10,000 distinct users make no more metric series than 100 do: no label names a user or a
bucket, while the per-rule gauges still count every user's bucket."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from sidecar.config.loader import parse_config
from sidecar.config.ruleset import RuleSetHolder, build_ruleset
from sidecar.engine import Engine
from sidecar.metering.charge import Observed
from sidecar.metrics import REGISTRY
from sidecar.model import Identity, RequestAttrs, TokenUsage
from sidecar.store.sqlite_store import SQLiteStore

# Each call reserves and then costs $0.01 (one output token at $10,000 per million).
PRICE = {"provider": "openai", "model": "card-*", "input_per_mtok": 0, "output_per_mtok": 10000}
BODY = json.dumps({"model": "card-a", "max_tokens": 1, "messages": []}).encode()


class HeaderAuth:
    """The caller named by a header: identity verification is not what is measured here."""

    async def identify(self, headers: Mapping[str, str]) -> tuple[Identity, tuple[str, ...]]:
        user = headers["x-user"]
        return Identity(
            kind="user", subject=user, email=user, groups=(f"team-{sum(map(ord, user)) % 5}",)
        ), ()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    st = SQLiteStore(f"sqlite:///{tmp_path}/c.db")
    yield st
    await st.close()


def at_threshold(threshold: str) -> float | None:
    return REGISTRY.get_sample_value(
        "sidecar_budget_buckets_at_threshold", {"rule": "card-user", "threshold": threshold}
    )


def series() -> int:
    return sum(len(family.samples) for family in REGISTRY.collect())


async def test_series_do_not_grow_with_ten_thousand_users(store: SQLiteStore) -> None:
    rs = build_ruleset(
        parse_config(
            {
                "providers": [{"id": "openai", "path_prefix": "/openai/"}],
                "pricing": {"unknown_model": "reject", "overrides": [PRICE]},
                "spend_limits": [
                    # $0.01 of $0.015: every user's bucket is at 66%.
                    {
                        "name": "card-user",
                        "budget_usd": 0.015,
                        "window": {"fixed": "daily"},
                        "split": ["user"],
                        "action": "block",
                        "alerts": [50, 90],
                    },
                    {
                        "name": "card-team",
                        "budget_usd": 1000,
                        "window": {"fixed": "daily"},
                        "split": ["group"],
                        "action": "monitor",
                        "alerts": [50],
                    },
                ],
            }
        )
    )
    auth = HeaderAuth()
    now = time.time()
    engine = Engine(RuleSetHolder(rs), store, lambda _: auth, clock=lambda: now)

    async def call(user: str) -> None:
        decision = await engine.check(
            RequestAttrs(
                "POST", "/openai/v1/chat/completions", {"x-user": user}, BODY, f"rid-{user}"
            )
        )
        assert decision.allowed, decision.body
        result, _ = await engine.charge(
            decision.request_id, Observed(TokenUsage(0, 1), complete=True)
        )
        assert result.status == "committed"

    async def users(start: int, end: int) -> int:
        for n in range(start, end):
            await call(f"user-{n}@example.com")
        engine.utilisation.refresh(engine.rules(rs), now)
        return series()

    after_hundred = await users(0, 100)
    assert at_threshold("50") == 100
    after_ten_thousand = await users(100, 10_000)
    assert after_ten_thousand == after_hundred
    assert at_threshold("50") == 10_000
    assert at_threshold("90") == 0
    assert REGISTRY.get_sample_value(
        "sidecar_budget_max_utilisation_ratio", {"rule": "card-user"}
    ) == pytest.approx(0.666)
    assert b"example.com" not in generate_latest(REGISTRY)
