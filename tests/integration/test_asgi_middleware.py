"""SidecarMiddleware around a small Starlette LLM proxy, driven by the official OpenAI SDK:
exact budgets, streamed usage charged while the stream flows, fallback body rewrites, and
budgets shared with an Envoy-fronted sidecar process on the same SQLite file."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from devtools.config import DEMO_PROVIDER_KEYS, demo_config
from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack
from sidecar.asgi import SidecarMiddleware
from sidecar.pricing import estimate_input_tokens
from tests.support.asgi_proxy import proxy_app, serve

FLAT = {"provider": "openai", "model": "flat-cent", "input_per_mtok": 0, "output_per_mtok": 10000}
# $0.001 per input token, $0.01 per output token: the actual cost differs from the estimate.
METERED = {
    "provider": "openai",
    "model": "metered-mini",
    "input_per_mtok": 1000,
    "output_per_mtok": 10000,
}
LIMITS = [
    {
        "name": "nickel",
        "budget_usd": 0.05,
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
]
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a short story about budgets."}]


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer
) -> Iterator[tuple[Stack, str]]:
    workdir = tmp_path_factory.mktemp("asgi")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    config = demo_config(
        issuer,
        jwks,
        # The sidecar process and the middleware in this one both use the file.
        {"url": f"sqlite:///{workdir}/shared.db", "shared": True},
        spend_limits=LIMITS,
        fallbacks={"gpt-4o": [{"model": "flat-cent", "provider": "openai"}]},
        pricing={"unknown_model": "reject", "overrides": [FLAT, METERED]},
    )
    with running_stack(workdir, issuer, config) as stack:
        app = SidecarMiddleware(
            proxy_app(stack.provider_url),
            config_path=stack.config_path,
            exempt_paths=("/healthz", "/_proxy_seen"),
        )
        with serve(app) as url:
            yield stack, url


def sdk(url: str, token: str) -> openai.OpenAI:
    # No retries: a 429 must be seen as it is, not retried into the next window.
    return openai.OpenAI(base_url=url + "/openai/v1", api_key=token, max_retries=0, timeout=60)


def cent(client: openai.OpenAI) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="flat-cent", max_tokens=1, messages=MESSAGES
    )


def usage_of(stack: Stack, user: str, requests: int = 1) -> dict[str, Any]:
    """The user's ledger row once `requests` calls are on it. A stream's client may see
    `data: [DONE]` a moment before the body's end, where the charge is made."""
    deadline = time.monotonic() + 10
    with stack.admin() as admin:
        while True:
            rows = admin.get("/v1/usage", params={"group_by": "user"}).json()["result"]
            row = next((r for r in rows if r["user"] == user), None)
            if (row is not None and row["requests"] >= requests) or time.monotonic() > deadline:
                assert row is not None, rows
                return dict(row)
            time.sleep(0.1)


def test_budget_enforced_after_the_exact_count(setup: tuple[Stack, str], issuer: DevIssuer) -> None:
    stack, url = setup
    client = sdk(url, issuer.mint("mia@example.com", ["ml"]))
    for i in range(5):
        raw = cent(client)
        assert raw.headers["x-sidecar-budget-remaining"] == f"{0.04 - i * 0.01:.6f}"
        completion = raw.parse()
        assert completion.usage is not None and completion.usage.completion_tokens == 1
    with pytest.raises(openai.RateLimitError) as denied:
        cent(client)
    error = denied.value.response.json()["error"]
    assert error["type"] == "spend_limit_exceeded" and error["rule"] == "nickel"
    assert error["spent"] == 0.05 and error["limit"] == 0.05
    assert int(denied.value.response.headers["retry-after"]) > 0
    # The app saw the identity and the provider key the sidecar holds, never the caller's JWT.
    seen = httpx.get(url + "/_proxy_seen", timeout=10).json()[-1]
    assert seen["x-sidecar-email"] == "mia@example.com"
    assert seen["x-sidecar-groups"] == "ml"
    assert seen["x-sidecar-model"] == "flat-cent"
    assert seen["authorization"] == f"Bearer {DEMO_PROVIDER_KEYS['openai']}"
    assert stack.seen()[-1]["headers"]["authorization"] == f"Bearer {DEMO_PROVIDER_KEYS['openai']}"
    assert usage_of(stack, "mia@example.com", 5)["cost_usd"] == 0.05


def test_streamed_usage_is_charged_without_buffering(
    setup: tuple[Stack, str], issuer: DevIssuer
) -> None:
    stack, url = setup
    client = sdk(url, issuer.mint("stream@example.com"))
    # No max_tokens: admission estimates default_max_output_tokens (1024) output tokens,
    # the provider generates 20, so only metering can charge the right amount.
    body = {
        "model": "metered-mini",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.monotonic()
    arrivals: list[float] = []
    text = ""
    final_usage = None
    stream = client.chat.completions.create(
        model="metered-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-fake-delay-ms": "40"},
    )
    for chunk in stream:
        arrivals.append(time.monotonic() - started)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            final_usage = chunk.usage
    assert text and final_usage is not None
    # Chunks arrived as the provider produced them, not all at once at the end.
    assert arrivals[-1] - arrivals[0] > 0.5, arrivals
    usage = expected_usage("openai_chat", body)
    assert final_usage.prompt_tokens == usage.total_input
    expected_micros = usage.total_input * 1000 + usage.output_tokens * 10000
    estimate_micros = estimate_input_tokens(body) * 1000 + 1024 * 10000
    assert estimate_micros != expected_micros
    row = usage_of(stack, "stream@example.com")
    assert row["cost_usd"] == expected_micros / 1_000_000
    assert row["requests"] == 1
    assert row["input_tokens"] == usage.total_input
    assert row["output_tokens"] == usage.output_tokens


def test_stream_without_include_usage_is_still_metered(
    setup: tuple[Stack, str], issuer: DevIssuer
) -> None:
    stack, url = setup
    client = sdk(url, issuer.mint("plainstream@example.com"))
    chunks = list(
        client.chat.completions.create(
            model="metered-mini", max_tokens=3, messages=MESSAGES, stream=True
        )
    )
    # The middleware asked for usage (as ext_proc does) and took its event out again.
    assert chunks and all(c.choices and c.usage is None for c in chunks)
    usage = expected_usage("openai_chat", {"messages": MESSAGES, "max_tokens": 3})
    row = usage_of(stack, "plainstream@example.com")
    assert row["cost_usd"] == (usage.total_input * 1000 + usage.output_tokens * 10000) / 1e6


def test_fallback_rewrites_the_body_model(setup: tuple[Stack, str], issuer: DevIssuer) -> None:
    stack, url = setup
    stack.clear_seen()
    raw = sdk(url, issuer.mint("fred@example.com")).chat.completions.with_raw_response.create(
        model="gpt-4o", max_tokens=2, messages=MESSAGES
    )
    assert raw.headers["x-sidecar-fallback-from"] == "gpt-4o"
    assert raw.headers["x-sidecar-model"] == "flat-cent"
    assert raw.parse().model == "flat-cent"
    seen = stack.seen()[-1]
    assert seen["body"]["model"] == "flat-cent"
    assert seen["headers"]["x-sidecar-route"] == "fallback"


def test_budget_is_shared_with_the_envoy_sidecar(
    setup: tuple[Stack, str], issuer: DevIssuer
) -> None:
    stack, url = setup
    token = issuer.mint("shared@example.com")
    for _ in range(5):
        cent(sdk(url, token))

    def via_envoy(tok: str) -> httpx.Response:
        return httpx.post(
            stack.envoy_url + "/openai/v1/chat/completions",
            headers={"authorization": f"Bearer {tok}"},
            timeout=30,
            json={"model": "flat-cent", "max_tokens": 1, "messages": MESSAGES},
        )

    # The sidecar process behind Envoy reads the same SQLite file: the budget is gone.
    refused = via_envoy(token)
    assert refused.status_code == 429
    assert refused.json()["error"]["spent"] == 0.05
    # And the other way round: spend made through Envoy counts in the middleware.
    other = issuer.mint("shared2@example.com")
    assert [via_envoy(other).status_code for _ in range(5)] == [200] * 5
    with pytest.raises(openai.RateLimitError):
        cent(sdk(url, other))


def test_refusals_before_the_app(setup: tuple[Stack, str], issuer: DevIssuer) -> None:
    _, url = setup
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        sdk(url, "not-a-jwt").chat.completions.create(model="flat-cent", messages=MESSAGES)
    assert unauthenticated.value.response.json()["error"]["type"] == "unauthenticated"
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        sdk(url, issuer.mint("intern@example.com", ["interns"])).chat.completions.create(
            model="gpt-4o", messages=MESSAGES
        )
    assert forbidden.value.response.json()["error"]["type"] == "model_not_allowed"
    big = httpx.post(
        url + "/openai/v1/chat/completions",
        timeout=30,
        headers={"authorization": f"Bearer {issuer.mint('big@example.com')}"},
        content=b"x" * (1024 * 1024 + 1),
    )
    assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"
    bad = httpx.post(
        url + "/openai/v1/chat/completions",
        timeout=30,
        content=b"{not json",
        headers={"authorization": f"Bearer {issuer.mint('bad@example.com')}"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "bad_request"
    assert httpx.get(url + "/healthz", timeout=10).status_code == 200


def test_provider_error_costs_nothing_and_counts_as_an_error(
    setup: tuple[Stack, str], issuer: DevIssuer
) -> None:
    stack, url = setup
    with pytest.raises(openai.RateLimitError):
        sdk(url, issuer.mint("asgi-err@example.com")).chat.completions.create(
            model="metered-mini",
            messages=MESSAGES,
            max_tokens=50,
            extra_headers={"x-fake-status": "429"},
        )
    row = usage_of(stack, "asgi-err@example.com")
    assert (row["cost_usd"], row["requests"], row["errors"]) == (0, 1, 1)
