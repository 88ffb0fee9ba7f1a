"""Dollar budgets through a real Envoy: exact admission counts, concurrency, replicas,
fallback routing, and the 429 answer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime
from typing import Any

import anthropic
import httpx
import pytest

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.procs import start_redis
from devtools.redis_cluster import start_redis_cluster
from devtools.stack import Stack, running_stack
from tests.support.ledger import eventually

CHAT = "/openai/v1/chat/completions"
# $10,000 per million output tokens and max_tokens 1: every request costs exactly $0.01, as
# estimate and as actual (the fake provider generates exactly max_tokens tokens).
FLAT = {"provider": "openai", "model": "flat-cent", "input_per_mtok": 0, "output_per_mtok": 10000}
LIMITS = [
    {
        "name": "per-user-dime",
        "budget_usd": 0.10,
        "window": {"fixed": "daily"},
        "filter": {"model": ["flat-*"]},
        "split": ["user"],
        "action": "block",
    },
    {
        "name": "gpt4o-fallback",
        "budget_usd": 0.000001,
        "window": {"rolling": "1h"},
        "filter": {"model": ["gpt-4o"]},
        "action": "fallback",
    },
    {
        "name": "opus-none",
        "budget_usd": 0,
        "window": {"fixed": "daily"},
        "filter": {"model": ["claude-opus-*"]},
        "action": "fallback",
    },
    {
        "name": "kimi-tight",
        "budget_usd": 0.000001,
        "window": {"fixed": "daily"},
        "filter": {"model": ["@cf/*"], "user": ["broke@example.com"]},
        "action": "block",
    },
]
FALLBACKS = {
    "gpt-4o": [{"model": "@cf/moonshotai/kimi-k2.6", "provider": "workers-ai"}],
    "claude-opus-4-7": [{"model": "claude-haiku-4-5"}],
}


def budget_config(issuer: DevIssuer, jwks: str, store: str) -> dict[str, Any]:
    return demo_config(
        issuer,
        jwks,
        store,
        spend_limits=LIMITS,
        fallbacks=FALLBACKS,
        pricing={"unknown_model": "reject", "overrides": [FLAT]},
    )


@pytest.fixture(scope="module")
def budget_stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("budgets")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    with running_stack(
        workdir, issuer, budget_config(issuer, jwks, f"sqlite:///{workdir}/s.db")
    ) as stack:
        yield stack


@pytest.fixture(scope="module", params=["redis", "cluster"])
def redis_replicas(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer
) -> Iterator[Stack]:
    """Two sidecar processes sharing one Redis, or a Redis Cluster of three primaries."""
    workdir = tmp_path_factory.mktemp("replicas")
    with ExitStack() as running:
        if request.param == "redis":
            redis, port = start_redis(workdir)
            running.enter_context(redis)
            url = f"redis://127.0.0.1:{port}/0"
        else:
            url = running.enter_context(start_redis_cluster(workdir / "cluster")).url
        jwks = str(issuer.write_jwks(workdir / "jwks.json"))
        config = budget_config(issuer, jwks, url)
        with running_stack(workdir, issuer, config, extra_sidecars=1) as stack:
            yield stack


def cent_request(stack: Stack, token: str, model: str = "flat-cent") -> httpx.Response:
    return httpx.post(
        stack.envoy_url + CHAT,
        headers={"authorization": f"Bearer {token}"},
        json={"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )


def _ledger_requests(stack: Stack, email: str) -> int:
    with stack.admin() as admin:
        rows = admin.get("/v1/usage", params={"group_by": "user"}).json()["result"]
    return sum(int(r["requests"]) for r in rows if r["user"] == email)


def test_dime_admits_exactly_ten_then_429(budget_stack: Stack, issuer: DevIssuer) -> None:
    alice = issuer.mint("alice@example.com")
    for i in range(10):
        response = cent_request(budget_stack, alice)
        assert response.status_code == 200, (i, response.text)
        assert response.headers["x-sidecar-budget-remaining"] == f"{0.09 - i * 0.01:.6f}"
    # Charged from the access log within ~50 ms of each call's end: the 429 below is the
    # same either way (the reservation still counts), its `spent` once all ten are in.
    deadline = time.monotonic() + 30
    while _ledger_requests(budget_stack, "alice@example.com") < 10:
        assert time.monotonic() < deadline, "the ten calls were never charged"
        time.sleep(0.05)
    denied = cent_request(budget_stack, alice)
    assert denied.status_code == 429
    error = denied.json()["error"]
    assert denied.json()["success"] is False
    assert error["type"] == "spend_limit_exceeded"
    assert error["rule"] == "per-user-dime"
    assert error["bucket"] == "user=alice@example.com"
    assert error["limit"] == 0.1 and error["spent"] == 0.1
    resets = datetime.fromisoformat(error["resets_at"].replace("Z", "+00:00"))
    retry_after = int(denied.headers["retry-after"])
    assert abs(resets.timestamp() - time.time() - retry_after) < 5
    assert 0 < retry_after <= 86_400
    assert "message" in error
    # Another user has a bucket of their own.
    assert cent_request(budget_stack, issuer.mint("bob@example.com")).status_code == 200


def test_forty_concurrent_never_overshoot_sqlite(budget_stack: Stack, issuer: DevIssuer) -> None:
    token = issuer.mint("concurrent@example.com")
    with ThreadPoolExecutor(max_workers=40) as pool:
        statuses = list(
            pool.map(lambda _: cent_request(budget_stack, token).status_code, range(40))
        )
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 30


def test_forty_concurrent_across_two_replicas_on_redis_or_a_cluster(
    redis_replicas: Stack, issuer: DevIssuer
) -> None:
    assert len(redis_replicas.sidecars) == 2
    token = issuer.mint("replicated@example.com")
    with ThreadPoolExecutor(max_workers=40) as pool:
        statuses = list(
            pool.map(lambda _: cent_request(redis_replicas, token).status_code, range(40))
        )
    assert statuses.count(200) == 10, statuses
    # Both replicas answered checks (round robin), so the bucket really was shared.
    # A decision line is written at the sidecar's next turn of its event loop.
    eventually(
        lambda: all(decided(p.log_path.read_text()) for p in redis_replicas.sidecars) or None,
        what="decision lines from both replicas",
    )


def test_fallback_switches_route_and_model(budget_stack: Stack, issuer: DevIssuer) -> None:
    budget_stack.clear_seen()
    response = httpx.post(
        budget_stack.envoy_url + CHAT,
        headers={"authorization": f"Bearer {issuer.mint('carol@example.com')}"},
        json={"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-sidecar-model"] == "@cf/moonshotai/kimi-k2.6"
    assert response.headers["x-sidecar-fallback-from"] == "gpt-4o"
    seen = budget_stack.seen()[-1]
    assert seen["headers"]["host"] == "api.cloudflare.com"
    assert seen["body"]["model"] == "@cf/moonshotai/kimi-k2.6"
    assert response.json()["model"] == "@cf/moonshotai/kimi-k2.6"


def test_same_provider_fallback_keeps_the_api_path(budget_stack: Stack, issuer: DevIssuer) -> None:
    budget_stack.clear_seen()
    client = anthropic.Anthropic(
        base_url=budget_stack.envoy_url + "/anthropic",
        api_key="unused",
        max_retries=0,
        default_headers={"authorization": f"Bearer {issuer.mint('ola@example.com')}"},
    )
    message = client.messages.create(
        model="claude-opus-4-7", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.model == "claude-haiku-4-5"
    seen = budget_stack.seen()[-1]
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["host"] == "api.anthropic.com"
    assert seen["body"]["model"] == "claude-haiku-4-5"


def test_fallback_model_rules_apply_and_exhausted_chain_is_429(
    budget_stack: Stack, issuer: DevIssuer
) -> None:
    response = httpx.post(
        budget_stack.envoy_url + CHAT,
        headers={"authorization": f"Bearer {issuer.mint('broke@example.com')}"},
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 429
    assert response.json()["error"]["rule"] == "kimi-tight"


def test_client_route_header_cannot_force_fallback(budget_stack: Stack, issuer: DevIssuer) -> None:
    budget_stack.clear_seen()
    response = httpx.post(
        budget_stack.envoy_url + CHAT,
        headers={
            "authorization": f"Bearer {issuer.mint('dave@example.com')}",
            "x-sidecar-route": "fallback",
            "x-sidecar-provider": "workers-ai",
            "x-sidecar-model": "@cf/meta/llama",
        },
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    seen = budget_stack.seen()[-1]
    assert seen["headers"]["host"] == "api.openai.com"
    assert seen["body"]["model"] == "gpt-4o-mini"
    assert seen["headers"]["x-sidecar-model"] == "gpt-4o-mini"
    assert seen["headers"]["x-sidecar-provider"] == "openai"


def test_metadata_header_is_validated(budget_stack: Stack, issuer: DevIssuer) -> None:
    token = issuer.mint("erin@example.com")
    for bad in ('{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6}', "[1]", '{"a": {"nested": 1}}', "{"):
        response = httpx.post(
            budget_stack.envoy_url + CHAT,
            headers={"authorization": f"Bearer {token}", "cf-aig-metadata": bad},
            json={"model": "gpt-4o-mini", "messages": []},
            timeout=30,
        )
        assert response.status_code == 400, bad
    ok = httpx.post(
        budget_stack.envoy_url + CHAT,
        headers={
            "authorization": f"Bearer {token}",
            "cf-aig-metadata": '{"team": "search", "run": 7, "ci": true}',
        },
        json={"model": "gpt-4o-mini", "messages": []},
        timeout=30,
    )
    assert ok.status_code == 200


def test_budgets_me_and_simulate(budget_stack: Stack, issuer: DevIssuer) -> None:
    token = issuer.mint("frank@example.com")
    assert cent_request(budget_stack, token).status_code == 200
    # Charged from the access log shortly after the call: wait for the ledger to say so,
    # then the bucket shows the cent as spent and nothing still held for it.
    deadline = time.monotonic() + 30
    while _ledger_requests(budget_stack, "frank@example.com") < 1:
        assert time.monotonic() < deadline, "the call was never charged"
        time.sleep(0.05)
    mine = httpx.get(
        budget_stack.admin_url + "/v1/budgets/me",
        params={"model": "flat-cent"},
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    ).json()["result"]
    dime = next(b for b in mine if b["rule"] == "per-user-dime")
    assert dime["limit"] == 0.1
    assert dime["spent"] == 0.01 and dime["reserved"] == 0
    assert dime["remaining"] == 0.09
    assert httpx.get(budget_stack.admin_url + "/v1/budgets/me", timeout=10).status_code == 401
    with budget_stack.admin() as admin:
        result = admin.post(
            "/v1/simulate",
            json={
                "identity": {"email": "alice@example.com"},
                "model": "flat-cent",
                "provider": "openai",
                "max_tokens": 1,
            },
        ).json()["result"]
        assert result["decision"] == "deny" and result["status"] == 429
        fallback = admin.post(
            "/v1/simulate", json={"identity": {"email": "zed@example.com"}, "model": "gpt-4o"}
        ).json()["result"]
        assert fallback["decision"] == "fallback"
        assert fallback["model"] == "@cf/moonshotai/kimi-k2.6"
        bad = admin.post("/v1/simulate", json={"model": 5})
        assert bad.status_code == 400 and bad.json()["success"] is False


def test_runtime_spend_limit_crud(budget_stack: Stack, issuer: DevIssuer) -> None:
    token = issuer.mint("gina@example.com", ["contractors"])
    rule = {
        "name": "contractors",
        "budget_usd": 0.02,
        "window": {"fixed": "weekly"},
        "filter": {"group": ["contractors"], "model": ["flat-*"]},
        "action": "block",
    }
    with budget_stack.admin() as admin:
        created = admin.post("/v1/spend-limits", json=rule)
        assert created.status_code == 201, created.text
        assert admin.post("/v1/spend-limits", json=rule).status_code == 409
        assert (
            admin.post("/v1/spend-limits", json={**rule, "name": "per-user-dime"}).status_code
            == 409
        )
        for bad in (
            {**rule, "name": "x", "budget_usd": -1},
            {**rule, "name": "x", "window": {"fixed": "hourly"}},
            {**rule, "name": "x", "split": ["team"]},
            {"name": "x"},
        ):
            response = admin.post("/v1/spend-limits", json=bad)
            assert response.status_code == 400, bad
        names = [r["name"] for r in admin.get("/v1/spend-limits").json()["result"]]
        assert "contractors" in names and "per-user-dime" in names
        assert [cent_request(budget_stack, token).status_code for _ in range(3)] == [200, 200, 429]
        replaced = admin.put("/v1/spend-limits/contractors", json={**rule, "budget_usd": 1})
        assert replaced.status_code == 200
        assert cent_request(budget_stack, token).status_code == 200
        assert admin.delete("/v1/spend-limits/contractors").status_code == 200
        assert admin.delete("/v1/spend-limits/contractors").status_code == 404
        assert admin.delete("/v1/spend-limits/per-user-dime").status_code == 409
    assert (
        httpx.get(
            budget_stack.admin_url + "/v1/spend-limits",
            headers={"authorization": f"Bearer {token}"},
            timeout=10,
        ).status_code
        == 403
    )


def test_unknown_model_price_is_403(budget_stack: Stack, issuer: DevIssuer) -> None:
    response = cent_request(budget_stack, issuer.mint("hal@example.com"), "my-secret-model")
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "unpriced_model"


def test_new_limit_counts_spend_made_before_it(budget_stack: Stack, issuer: DevIssuer) -> None:
    token = issuer.mint("early@example.com")
    assert [cent_request(budget_stack, token).status_code for _ in range(5)] == [200] * 5
    # The access log charges a call within ~50 ms of its end: the limit is made once all
    # five are on the ledger it is seeded from.
    deadline = time.monotonic() + 30
    while _ledger_requests(budget_stack, "early@example.com") < 5:
        assert time.monotonic() < deadline, "the five calls were never charged"
        time.sleep(0.05)
    rule = {
        "name": "late-limit",
        "budget_usd": 0.07,
        "window": {"fixed": "monthly"},
        "filter": {"user": ["early@example.com"]},
        "action": "block",
    }
    with budget_stack.admin() as admin:
        assert admin.post("/v1/spend-limits", json=rule).status_code == 201
        try:
            # $0.05 was spent before the limit existed: two more cents fit, then 429.
            statuses = [cent_request(budget_stack, token).status_code for _ in range(3)]
            assert statuses == [200, 200, 429]
            assert cent_request(budget_stack, token).json()["error"]["rule"] == "late-limit"
        finally:
            admin.delete("/v1/spend-limits/late-limit")


def decided(log: str) -> bool:
    return '"decision": "allow"' in log or '"decision": "deny"' in log
