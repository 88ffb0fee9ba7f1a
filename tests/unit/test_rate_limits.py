"""Rules that limit requests or tokens beside dollars: admission, refusals, Retry-After, the
rate-limit headers, commits in tokens and fallbacks, on a real SQLite store with an
injected clock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sidecar.alerts import Alerts
from sidecar.budget.explain import budgets_for, simulate
from sidecar.budget.spool import Spool
from sidecar.config.loader import parse_config
from sidecar.config.models import SpendLimitConfig
from sidecar.config.ruleset import RuleSet, RuleSetHolder, build_ruleset
from sidecar.engine import Engine
from sidecar.grpc_api import budget_message
from sidecar.http.dashboard.data import buckets as dashboard_buckets
from sidecar.http.dashboard.data import gather
from sidecar.http.dashboard.page import render
from sidecar.metering.charge import Observed, charge_tokens
from sidecar.metrics import REGISTRY
from sidecar.model import Decision, Identity, RequestAttrs, TokenUsage
from sidecar.pricing import estimate_input_tokens
from sidecar.store.budget_types import BucketView, LedgerDims, ReserveRequest
from sidecar.store.sqlite_store import SQLiteStore

T0 = 1_900_000_020.0  # a whole minute: slot boundaries of 1 s and 1 min fall on it
BOT = Identity(kind="service", subject="bot", token_name="bot", groups=("agents",))
PRICES = [
    {"provider": "openai", "model": "big", "input_per_mtok": 10, "output_per_mtok": 30},
    {"provider": "openai", "model": "small", "input_per_mtok": 1, "output_per_mtok": 2},
]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FixedAuth:
    async def identify(self, headers: Mapping[str, str]) -> tuple[Identity, tuple[str, ...]]:
        return BOT, ()


def ruleset(*limits: dict[str, Any], **extra: Any) -> RuleSet:
    return build_ruleset(
        parse_config(
            {
                "providers": [{"id": "openai", "path_prefix": "/openai/"}],
                "pricing": {"unknown_model": "reject", "overrides": PRICES},
                "spend_limits": list(limits),
                **extra,
            }
        )
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    st = SQLiteStore(f"sqlite:///{tmp_path}/rl.db")
    yield st
    await st.close()


def engine(rs: RuleSet, store: SQLiteStore, clock: Clock) -> Engine:
    auth = FixedAuth()
    return Engine(RuleSetHolder(rs), store, lambda _: auth, clock=clock)


BODY: dict[str, Any] = {"model": "big", "messages": [{"role": "user", "content": "hi"}]}
PROMPT_TOKENS = estimate_input_tokens(BODY)


def attrs(model: str = "big", max_tokens: int = 100) -> RequestAttrs:
    body = json.dumps({**BODY, "model": model, "max_tokens": max_tokens}).encode()
    return RequestAttrs("POST", "/openai/v1/chat/completions", {}, body)


def error(decision: Decision) -> dict[str, Any]:
    assert decision.http_status == 429, decision
    return dict(json.loads(decision.body)["error"])


async def test_requests_rule_admits_its_limit_then_refuses_in_requests(store: SQLiteStore) -> None:
    clock = Clock()
    eng = engine(
        ruleset({"name": "rpm", "requests": 10, "window": {"rolling": "1m"}}), store, clock
    )
    admitted = [await eng.check(attrs()) for _ in range(10)]
    assert all(d.allowed for d in admitted)
    body = error(await eng.check(attrs()))
    assert (body["rule"], body["unit"], body["limit"], body["spent"], body["reserved"]) == (
        "rpm",
        "requests",
        10,
        0,
        10,
    )
    # Completing a request still counts it: a request is one request whatever it cost.
    for d in admitted:
        await eng.charge(d.request_id, Observed(TokenUsage(1, 1), complete=True))
    assert error(await eng.check(attrs()))["spent"] == 10


async def test_retry_after_is_when_enough_requests_age_out(store: SQLiteStore) -> None:
    clock = Clock()
    eng = engine(ruleset({"name": "rpm", "requests": 2, "window": {"rolling": "1m"}}), store, clock)
    first = await eng.check(attrs())
    clock.now = T0 + 20
    second = await eng.check(attrs())
    for d in (first, second):
        await eng.charge(d.request_id, Observed(TokenUsage(1, 1), complete=True))
    clock.now = T0 + 30
    refused = await eng.check(attrs())
    # One request must leave the window: the one made at T0 does at T0 + 60.
    assert refused.headers["retry-after"] == "30"
    assert error(refused)["resets_at"] == datetime.fromtimestamp(T0 + 60, UTC).isoformat().replace(
        "+00:00", "Z"
    )
    clock.now = T0 + 59
    assert not (await eng.check(attrs())).allowed
    clock.now = T0 + 60
    assert (await eng.check(attrs())).allowed


async def test_rolling_10s_window_readmits_after_it_ages_out(store: SQLiteStore) -> None:
    clock = Clock()
    eng = engine(
        ruleset({"name": "burst", "requests": 3, "window": {"rolling": "10s"}}), store, clock
    )
    for _ in range(3):
        d = await eng.check(attrs())
        assert d.allowed
        await eng.charge(d.request_id, Observed(TokenUsage(1, 1), complete=True))
    clock.now = T0 + 9.5
    refused = await eng.check(attrs())
    assert refused.http_status == 429 and refused.headers["retry-after"] == "1"
    clock.now = T0 + 10
    assert (await eng.check(attrs())).allowed


async def test_token_rule_reserves_the_estimate_and_frees_the_difference(
    store: SQLiteStore,
) -> None:
    clock = Clock()
    per_request = PROMPT_TOKENS + 1000
    limit = 2 * per_request + 100
    eng = engine(
        ruleset(
            {
                "name": "tpm",
                "tokens": limit,
                "window": {"rolling": "1m"},
                "filter": {"kind": ["service"]},
                "split": ["token"],
            }
        ),
        store,
        clock,
    )
    first = await eng.check(attrs(max_tokens=1000))
    second = await eng.check(attrs(max_tokens=1000))
    assert first.allowed and second.allowed
    assert first.response_headers["x-ratelimit-remaining-tokens"] == str(per_request + 100)
    assert second.response_headers["x-ratelimit-remaining-tokens"] == "100"
    body = error(await eng.check(attrs(max_tokens=1000)))
    assert (body["unit"], body["limit"], body["spent"], body["reserved"], body["bucket"]) == (
        "tokens",
        limit,
        0,
        2 * per_request,
        "token=bot",
    )
    # Actual usage far below the estimate: the difference is free at once.
    await eng.charge(first.request_id, Observed(TokenUsage(10, 20), complete=True))
    third = await eng.check(attrs(max_tokens=1000))
    assert third.allowed
    assert third.response_headers["x-ratelimit-remaining-tokens"] == "70"


async def test_a_response_without_usage_is_charged_the_reserved_tokens(store: SQLiteStore) -> None:
    clock = Clock()
    eng = engine(
        ruleset({"name": "tpm", "tokens": 10_000, "window": {"rolling": "1m"}}), store, clock
    )
    d = await eng.check(attrs(max_tokens=500))
    await eng.charge(d.request_id, Observed())
    [view] = await budgets_for(eng, BOT, "big", "openai")
    assert (view["spent"], view["reserved"]) == (PROMPT_TOKENS + 500, 0)


async def test_input_and_output_limits_are_separate_buckets(store: SQLiteStore) -> None:
    clock = Clock()
    eng = engine(
        ruleset(
            {
                "name": "io",
                "tokens": {"input": 100_000, "output": 1500},
                "window": {"rolling": "1m"},
            }
        ),
        store,
        clock,
    )
    assert (await eng.check(attrs(max_tokens=1000))).allowed
    body = error(await eng.check(attrs(max_tokens=1000)))
    assert (body["rule"], body["unit"], body["tokens"], body["limit"]) == (
        "io",
        "tokens",
        "output",
        1500,
    )
    assert (await eng.check(attrs(max_tokens=500))).allowed


async def test_rate_limit_headers_name_the_tightest_rule_of_each_unit(store: SQLiteStore) -> None:
    clock = Clock()
    eng = engine(
        ruleset(
            {"name": "rpm", "requests": 50, "window": {"rolling": "1m"}},
            {
                "name": "rpm-bots",
                "requests": 5,
                "window": {"rolling": "1m"},
                "filter": {"kind": ["service"]},
            },
            {"name": "rpm-watch", "requests": 1, "window": {"rolling": "1m"}, "action": "monitor"},
            {"name": "tpm", "tokens": 90_000, "window": {"rolling": "1m"}},
            {"name": "usd", "budget_usd": 5, "window": {"fixed": "daily"}},
        ),
        store,
        clock,
    )
    d = await eng.check(attrs(max_tokens=1000))
    assert d.allowed
    headers = d.response_headers
    # The monitor rule is full but refuses nothing, so it is no rate limit.
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == (
        "5",
        "4",
    )
    assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) == (
        "90000",
        str(90_000 - PROMPT_TOKENS - 1000),
    )
    assert "x-ratelimit-limit-usd" not in headers
    assert "x-sidecar-budget-remaining" in headers
    for _ in range(4):
        assert (await eng.check(attrs(max_tokens=1000))).allowed
    refused = await eng.check(attrs(max_tokens=1000))
    assert error(refused)["rule"] == "rpm-bots"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-limit-requests"] == "5"


async def test_no_rate_limit_headers_without_request_or_token_rules(store: SQLiteStore) -> None:
    eng = engine(
        ruleset({"name": "usd", "budget_usd": 5, "window": {"fixed": "daily"}}), store, Clock()
    )
    d = await eng.check(attrs())
    assert d.allowed and not any(h.startswith("x-ratelimit") for h in d.response_headers)


async def test_fallback_token_rule_routes_to_the_cheaper_model(store: SQLiteStore) -> None:
    clock = Clock()
    eng = engine(
        ruleset(
            {
                "name": "big-tpm",
                "tokens": PROMPT_TOKENS + 1000,
                "window": {"rolling": "1m"},
                "filter": {"model": ["big"]},
                "action": "fallback",
            },
            fallbacks={"big": [{"model": "small"}]},
        ),
        store,
        clock,
    )
    assert (await eng.check(attrs(max_tokens=1000))).model == "big"
    routed = await eng.check(attrs(max_tokens=1000))
    assert routed.allowed and routed.model == "small"
    assert routed.headers["x-sidecar-fallback-from"] == "big"


async def test_budgets_and_simulate_report_each_rule_in_its_unit(store: SQLiteStore) -> None:
    clock = Clock()
    eng = engine(
        ruleset(
            {"name": "rpm", "requests": 3, "window": {"rolling": "1m"}},
            {"name": "tpm", "tokens": 1000, "window": {"rolling": "10s"}},
            {"name": "usd", "budget_usd": 2, "window": {"fixed": "daily"}},
        ),
        store,
        clock,
    )
    await eng.check(attrs(max_tokens=100))
    views = {v["rule"]: v for v in await budgets_for(eng, BOT, "big", "openai")}
    assert {
        k: (v["unit"], v["limit"], v["reserved"], v["remaining"]) for k, v in views.items()
    } == {
        "rpm": ("requests", 3, 1, 2),
        "tpm": ("tokens", 1000, PROMPT_TOKENS + 100, 1000 - PROMPT_TOKENS - 100),
        "usd": ("usd", 2.0, views["usd"]["reserved"], views["usd"]["remaining"]),
    }
    rs = eng.holder.current
    result = await simulate(
        eng, BOT, "big", rs.provider_by_id["openai"], {}, {**BODY, "max_tokens": 1000}
    )
    fits = {b["rule"]: b["fits"] for b in result["steps"][0]["buckets"]}
    assert fits == {"rpm": True, "tpm": False, "usd": True}
    assert result["reason"] == "spend_limit_exceeded"


def test_a_rule_needs_exactly_one_unit() -> None:
    base = {"name": "r", "window": {"rolling": "10s"}}
    bad_units: list[dict[str, Any]] = [
        {},
        {"budget_usd": 1, "tokens": 5},
        {"tokens": 5, "requests": 1},
        {"tokens": {}},
        {"requests": 1.5},
        {"tokens": True},
        {"requests": -1},
    ]
    for bad in bad_units:
        with pytest.raises(ValidationError):
            SpendLimitConfig.model_validate({**base, **bad})
    for good in ({"budget_usd": 1}, {"tokens": 5}, {"tokens": {"output": 5}}, {"requests": 0}):
        assert SpendLimitConfig.model_validate({**base, **good}).public_doc().keys() == {
            "name",
            "window",
            "filter",
            "split",
            "action",
            "alerts",
            *good,
        }


def test_split_token_limits_compile_to_two_rules_of_one_name() -> None:
    rs = ruleset(
        {"name": "io", "tokens": {"input": 10, "output": 20}, "window": {"rolling": "10s"}}
    )
    assert [(r.name, r.unit, r.measure, r.limit) for r in rs.rules] == [
        ("io", "tokens", "input_tokens", 10),
        ("io", "tokens", "output_tokens", 20),
    ]
    assert rs.rules[0].window.slot_seconds == 1  # type: ignore[union-attr]


def test_tokens_charged_follow_the_cost_rule() -> None:
    assert charge_tokens((100, 500), Observed(TokenUsage(7, 9, 3), complete=True)) == (10, 9)
    # Cut short after a usage report: output raised to the text seen (4 bytes a token).
    assert charge_tokens((100, 500), Observed(TokenUsage(7, 9), output_bytes=400)) == (7, 100)
    # No usage: what was reserved, more output if more text went past.
    assert charge_tokens((100, 500), Observed()) == (100, 500)
    assert charge_tokens((100, 500), Observed(output_bytes=4000)) == (100, 1000)
    # A provider error without usage costs no tokens, as it costs $0.
    assert charge_tokens((100, 500), Observed(status=429)) == (0, 0)
    assert charge_tokens((100, 500), Observed(TokenUsage(7, 0), complete=True, status=400)) == (
        7,
        0,
    )


async def test_alerts_report_token_rules_in_tokens(store: SQLiteStore) -> None:
    posted: list[bytes] = []

    async def post(url: str, body: bytes, headers: dict[str, str]) -> None:
        posted.append(body)

    clock = Clock()
    rs = ruleset(
        {
            "name": "tpm",
            "tokens": 2 * (PROMPT_TOKENS + 100),
            "window": {"rolling": "1m"},
            "alerts": [50, 100],
        },
        alerts={"webhooks": [{"url": "http://hooks.invalid/x"}]},
    )
    holder = RuleSetHolder(rs)
    alerts = Alerts(store, holder, clock, post)
    auth = FixedAuth()
    eng = Engine(holder, store, lambda _: auth, alerts=alerts, clock=clock)
    assert (await eng.check(attrs(max_tokens=100))).allowed
    await alerts.drain()
    await alerts.drain()
    assert [
        (e["rule"], e["threshold_percent"], e["unit"], e["spent"], e["reserved"], e["limit"])
        for e in alerts.sent
    ] == [("tpm", 50, "tokens", 0, PROMPT_TOKENS + 100, 2 * (PROMPT_TOKENS + 100))]
    assert len(posted) == 1 and json.loads(posted[0])["unit"] == "tokens"


async def test_spool_replays_a_fail_open_admission_into_token_buckets(
    store: SQLiteStore, tmp_path: Path
) -> None:
    view = BucketView("tpm|rolling:60|tokens", int(T0), int(T0) - 59, 3_660, 1000, measure="tokens")
    requests = BucketView(
        "rpm|rolling:60|requests", int(T0), int(T0) - 59, 3_660, 10, measure="requests"
    )
    spool = Spool(str(tmp_path / "spool.db"))
    try:
        dims = LedgerDims("bot", (), "bot", "service", "big", "openai")
        await spool.admitted(
            ReserveRequest(
                "a", (view, requests), 500, "reserve", T0, T0 + 1, dims, tokens=(40, 200)
            )
        )
        await spool.admitted(
            ReserveRequest(
                "b", (view, requests), 500, "reserve", T0, T0 + 1, dims, tokens=(40, 200)
            )
        )
        await spool.completed("b", 90, TokenUsage(40, 10), tokens=(40, 10))
        # "a" never completed: charged its estimate, in tokens too; "b" its actual usage.
        assert await spool.replay(store, T0 + 2) == 2
    finally:
        await spool.close()
    states = await store.bucket_states([view, requests], T0 + 2)
    assert [(s.spent, s.reserved) for s in states] == [(240 + 50, 0), (2, 0)]


async def test_dashboard_lists_request_and_token_buckets_in_their_units(store: SQLiteStore) -> None:
    clock = Clock()
    eng = engine(
        ruleset(
            {"name": "rpm", "requests": 4, "window": {"rolling": "1m"}},
            {"name": "tpm", "tokens": 100_000, "window": {"rolling": "1m"}},
            {"name": "usd", "budget_usd": 2, "window": {"fixed": "daily"}},
        ),
        store,
        clock,
    )
    d = await eng.check(attrs(max_tokens=100))
    await eng.charge(d.request_id, Observed(TokenUsage(10, 20), complete=True))
    found, hidden = await dashboard_buckets(eng, clock.now)
    assert hidden == 0
    by_rule = {b.view["rule"]: b for b in found}
    assert (by_rule["rpm"].used, by_rule["rpm"].limit, by_rule["rpm"].percent) == (1, 4, 25.0)
    assert (by_rule["tpm"].used, by_rule["tpm"].limit) == (30, 100_000)
    page = render(await gather(eng, "hour", int(T0) - 3600, int(T0) + 3600))
    assert (
        'data-rule="rpm" data-bucket="(all)" data-unit="requests" data-used="1" '
        'data-limit="4"' in page
    )
    assert "1 requests / 4 requests" in page
    assert "30 tokens / 100,000 tokens" in page
    assert 'data-unit="usd" data-used-micros=' in page


def test_grpc_budget_message_carries_the_unit() -> None:
    base = {"rule": "r", "bucket": "(all)", "action": "block", "resets_at": "2030-01-01T00:00:00Z"}
    tokens = budget_message(
        {
            **base,
            "unit": "tokens",
            "tokens": "output",
            "limit": 1000,
            "spent": 30,
            "reserved": 70,
            "remaining": 900,
        }
    )
    assert (
        tokens.unit,
        tokens.tokens,
        tokens.limit,
        tokens.spent,
        tokens.reserved,
        tokens.remaining,
        tokens.limit_micros,
    ) == ("tokens", "output", 1000, 30, 70, 900, 0)
    usd = budget_message(
        {
            **base,
            "unit": "usd",
            "limit": 2.5,
            "spent": 0.000001,
            "reserved": 0,
            "remaining": 2.499999,
        }
    )
    assert (usd.unit, usd.limit_micros, usd.spent_micros, usd.remaining_micros, usd.limit) == (
        "usd",
        2_500_000,
        1,
        2_499_999,
        0,
    )


async def test_utilisation_of_separate_input_and_output_limits_is_the_larger(
    store: SQLiteStore,
) -> None:
    clock = Clock()
    eng = engine(
        ruleset(
            {
                "name": "io-util",
                "tokens": {"input": 4 * PROMPT_TOKENS, "output": 100_000},
                "window": {"rolling": "1m"},
            }
        ),
        store,
        clock,
    )
    for _ in range(2):
        assert (await eng.check(attrs(max_tokens=500))).allowed
    eng.utilisation.refresh(eng.rules(eng.holder.current), clock.now)
    # Input: half its limit reserved; output: 1,000 of 100,000.
    assert (
        REGISTRY.get_sample_value("sidecar_budget_max_utilisation_ratio", {"rule": "io-util"})
        == 0.5
    )
