"""Past capacity, through real Envoy: every request gets a completed 200 or a prompt 503
with Retry-After and the JSON envelope — never a 403, never a hang — and the ledger holds
exactly what was served. Refused by the sidecar itself (its in-flight bound), and by Envoy
before the Check reaches the sidecar (the Checks cluster's circuit breaker)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from devtools.config import demo_config
from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack
from sidecar.envoy.attach import CHECK_CLUSTER, CHECK_TIMEOUT_SECONDS
from sidecar.model import TokenUsage
from tests.support.prices import genai_micros

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Stream a few words for the overload test."}]
BODY = {
    "model": MODEL,
    "messages": MESSAGES,
    "max_tokens": 16,
    "stream": True,
    "stream_options": {"include_usage": True},
}
ARRIVALS = 300
USERS = 100


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("overload")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    # One Check at a time per process: a burst of arrivals is far past capacity. Envoy's
    # own bound far above it, so the sidecar is the one refusing. On a shared file every
    # reservation waits for the store's thread, so Checks overlap; a file the process owns
    # decides most of them without an await, one after another, never two in flight.
    config = demo_config(
        issuer,
        jwks,
        {"url": f"sqlite:///{workdir}/s.db", "shared": True},
        overload={"max_inflight": 1},
    )
    with running_stack(workdir, issuer, config, max_checks=10_000) as running:
        yield running


@pytest.fixture(scope="module")
def envoy_bound_stack(
    tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("overload-envoy-bound")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    # Envoy's bound as `sidecar envoy-config` derives it: max_inflight (1) Checks in flight.
    config = demo_config(issuer, jwks, f"sqlite:///{workdir}/s.db", overload={"max_inflight": 1})
    with running_stack(workdir, issuer, config) as running:
        yield running


def price(tokens_in: int, tokens_out: int) -> int:
    return genai_micros(TokenUsage(tokens_in, tokens_out), MODEL, "openai")


async def one(client: httpx.AsyncClient, token: str) -> tuple[int, dict[str, str], bytes]:
    async with client.stream(
        "POST",
        "/openai/v1/chat/completions",
        json=BODY,
        headers={"authorization": f"Bearer {token}", "x-fake-delay-ms": "20"},
    ) as response:
        body = await response.aread()
        return response.status_code, dict(response.headers), body


async def burst(stack: Stack, tokens: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    limits = httpx.Limits(max_connections=ARRIVALS, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=stack.envoy_url, limits=limits, timeout=httpx.Timeout(30.0)
    ) as client:
        return await asyncio.gather(*(one(client, tokens[i % USERS]) for i in range(ARRIVALS)))


def _envoy_stat(stack: Stack, name: str) -> int:
    text = httpx.get(stack.envoy_admin_url + "/stats", params={"filter": name}, timeout=10).text
    found = [
        line.partition(": ")[2] for line in text.splitlines() if line.partition(": ")[0] == name
    ]
    return int(found[0]) if found else 0


def _shed(stack: Stack, reason: str) -> float:
    metrics = httpx.get(stack.admin_url + "/metrics", timeout=10).text
    line = f'sidecar_shed_total{{reason="{reason}"}} '
    return sum(float(row[len(line) :]) for row in metrics.splitlines() if row.startswith(line))


def _metric(stack: Stack, name: str) -> float:
    metrics = httpx.get(stack.admin_url + "/metrics", timeout=10).text
    return sum(float(row.split()[-1]) for row in metrics.splitlines() if row.startswith(name + " "))


def _served_or_retryable_and_charged_exactly(stack: Stack, issuer: DevIssuer, prefix: str) -> int:
    """Sends the burst, checks every answer and the ledger; the number refused."""
    emails = [f"{prefix}-{i}@overload.test" for i in range(USERS)]
    tokens = [issuer.mint(email) for email in emails]
    results = asyncio.run(burst(stack, tokens))
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert served and refused, (len(served), len(refused))
    for status, headers, body in refused:
        assert status == 503, (status, body)
        assert headers.get("retry-after") == "1"
        assert headers["content-type"].startswith("application/json")
        answer = json.loads(body)
        # The sidecar's own prompt refusal, or Envoy's mapped answer for a Check that did
        # not come back in time: both retryable, both the envelope.
        assert answer["success"] is False
        assert answer["error"]["type"] in ("overloaded", "unavailable")
    for _, _, body in served:
        assert body.rstrip().endswith(b"data: [DONE]")  # every admitted stream completed
    usage = expected_usage("openai_chat", BODY)
    each = price(usage.total_input, usage.output_tokens)
    with stack.admin() as admin:

        def total() -> tuple[int, int]:
            rows = json.loads(admin.get("/v1/usage").text, parse_float=Decimal)["result"]
            return (
                sum(r["requests"] for r in rows),
                sum(int(r["cost_usd"] * 1_000_000) for r in rows),
            )

        until = time.monotonic() + 30
        while total()[0] < len(served) and time.monotonic() < until:
            time.sleep(0.2)
        assert total() == (len(served), len(served) * each)
    return len(refused)


def test_past_capacity_every_answer_is_served_or_a_retryable_503(
    stack: Stack, issuer: DevIssuer
) -> None:
    before = _shed(stack, "queue_full")
    queued = _metric(stack, "sidecar_check_queued_seconds_count")
    waited_before = _metric(stack, "sidecar_check_queued_seconds_sum")
    refused = _served_or_retryable_and_charged_exactly(stack, issuer, "burst")
    # The sidecar refused them itself, at once, before any identity or store work.
    assert _shed(stack, "queue_full") - before > 0
    assert refused > 0
    # Every Check handled saw Envoy's deadline (gRPC's time_remaining on the server's
    # uvloop), within Envoy's 2 s timeout: the time it queued is measured.
    handled = _metric(stack, "sidecar_check_queued_seconds_count") - queued
    assert handled >= ARRIVALS
    waited = _metric(stack, "sidecar_check_queued_seconds_sum") - waited_before
    assert 0 < waited < CHECK_TIMEOUT_SECONDS * handled


def test_checks_past_envoys_bound_are_refused_by_envoy_with_a_retryable_503(
    envoy_bound_stack: Stack, issuer: DevIssuer
) -> None:
    # Over max_requests (active), or over max_pending_requests while the connection opens.
    overflow = [
        f"cluster.{CHECK_CLUSTER}.upstream_rq_{kind}_overflow" for kind in ("active", "pending")
    ]
    before = sum(_envoy_stat(envoy_bound_stack, name) for name in overflow)
    refused = _served_or_retryable_and_charged_exactly(envoy_bound_stack, issuer, "bound")
    # Envoy's circuit breaker refused Checks beyond max_inflight before they reached the
    # sidecar (which therefore never had to shed for its own bound), mapped to the 503 +
    # Retry-After + JSON envelope of the listener's local reply: none was a 403.
    refused_by_envoy = sum(_envoy_stat(envoy_bound_stack, name) for name in overflow) - before
    assert refused > 0
    assert refused_by_envoy == refused
    assert _shed(envoy_bound_stack, "queue_full") == 0


def test_sidecar_gone_is_a_retryable_503_not_a_403(stack: Stack, issuer: DevIssuer) -> None:
    for sidecar in stack.sidecars:
        sidecar.stop()
    response = httpx.post(
        stack.envoy_url + "/openai/v1/chat/completions",
        json=BODY,
        headers={"authorization": f"Bearer {issuer.mint('late@x.test')}"},
        timeout=30,
    )
    assert response.status_code == 503, response.text
    assert response.headers.get("retry-after") == "1"
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["success"] is False
    assert response.json()["error"]["type"] == "unavailable"
