"""Request and token limits through a real Envoy: exact admission counts under concurrency
(SQLite, and two replicas on Redis), token reservations replaced by actual usage, a real
10-second rolling window, the rate-limit headers, and fallback on a token rule."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from devtools.config import demo_config
from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.procs import start_redis
from devtools.stack import Stack, running_stack
from sidecar.pricing import estimate_input_tokens
from tests.support.ledger import charged, eventually

CHAT = "/openai/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def _price(model: str) -> dict[str, Any]:
    return {"provider": "openai", "model": model, "input_per_mtok": 1, "output_per_mtok": 2}


# The fake provider generates at most 2,000 output tokens: a request asking for 5,000
# reserves far more than it uses.
ASKED = 5000
ESTIMATE = (
    estimate_input_tokens({"model": "tok-model", "max_tokens": ASKED, "messages": MESSAGES}) + ASKED
)
ACTUAL = expected_usage(
    "openai_chat", {"model": "tok-model", "max_tokens": ASKED, "messages": MESSAGES}
)
USED = ACTUAL.total_input + ACTUAL.output_tokens
TPM = ESTIMATE + 3000

LIMITS = [
    {
        "name": "rpm",
        "requests": 10,
        "window": {"rolling": "1m"},
        "filter": {"model": ["rpm-model"]},
        "split": ["user"],
        "action": "block",
    },
    {
        "name": "tpm",
        "tokens": TPM,
        "window": {"rolling": "1m"},
        "filter": {"model": ["tok-model"]},
        "split": ["user"],
        "action": "block",
    },
    {
        "name": "burst",
        "requests": 2,
        "window": {"rolling": "10s"},
        "filter": {"model": ["burst-model"]},
        "split": ["user"],
        "action": "block",
    },
    {
        "name": "big-tpm",
        "tokens": 500,
        "window": {"rolling": "1m"},
        "filter": {"model": ["big-model"]},
        "action": "fallback",
    },
]
MODELS = ("rpm-model", "tok-model", "burst-model", "big-model", "small-model")


def rate_config(issuer: DevIssuer, jwks: str, store: str) -> dict[str, Any]:
    # Forty checks at once on a busy test machine can lag the event loop past the default
    # load-shedding bound; these tests count budget decisions, so every check is decided.
    return demo_config(
        issuer,
        jwks,
        store,
        spend_limits=LIMITS,
        fallbacks={"big-model": [{"model": "small-model"}]},
        pricing={"unknown_model": "reject", "overrides": [_price(m) for m in MODELS]},
        overload={"max_loop_lag_seconds": 30},
    )


@pytest.fixture(scope="module")
def rate_stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("rates")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    with running_stack(
        workdir, issuer, rate_config(issuer, jwks, f"sqlite:///{workdir}/s.db")
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def rate_replicas(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("rate-replicas")
    redis, port = start_redis(workdir)
    with redis:
        jwks = str(issuer.write_jwks(workdir / "jwks.json"))
        config = rate_config(issuer, jwks, f"redis://127.0.0.1:{port}/0")
        with running_stack(workdir, issuer, config, extra_sidecars=1) as stack:
            yield stack


def call(stack: Stack, token: str, model: str, max_tokens: int = 1) -> httpx.Response:
    return httpx.post(
        stack.envoy_url + CHAT,
        headers={"authorization": f"Bearer {token}"},
        json={"model": model, "max_tokens": max_tokens, "messages": MESSAGES},
        timeout=30,
    )


def forty_at_once(stack: Stack, token: str) -> list[httpx.Response]:
    with ThreadPoolExecutor(max_workers=40) as pool:
        return list(pool.map(lambda _: call(stack, token, "rpm-model"), range(40)))


def requests_held(stack: Stack, token: str) -> int:
    """Spent + reserved of the caller's `rpm` bucket, as the store has it."""
    mine = httpx.get(
        stack.admin_url + "/v1/budgets/me",
        params={"model": "rpm-model", "provider": "openai"},
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    ).json()["result"]
    rpm = next(b for b in mine if b["rule"] == "rpm")
    return int(rpm["spent"]) + int(rpm["reserved"])


def assert_exactly_ten_admitted(stack: Stack, token: str, responses: list[httpx.Response]) -> None:
    statuses = [r.status_code for r in responses]
    others = [(r.status_code, r.text) for r in responses if r.status_code not in (200, 429)]
    assert set(statuses) <= {200, 429, 503}, others
    # Exactly ten admissions, in the store: never an eleventh.
    assert requests_held(stack, token) == 10
    # Each answered 200, unless Envoy stopped waiting for the answer (its 503 when a shared
    # machine is too loaded to answer within the ext_authz timeout): then strictly fewer.
    unanswered = statuses.count(503)
    assert 10 - unanswered <= statuses.count(200) <= 10, others
    assert statuses.count(429) >= 30 - unanswered, others
    if not unanswered:
        assert (statuses.count(200), statuses.count(429)) == (10, 30)


def test_forty_concurrent_against_ten_rpm_admit_exactly_ten_sqlite(
    rate_stack: Stack, issuer: DevIssuer
) -> None:
    token = issuer.mint("rpm@example.com")
    responses = forty_at_once(rate_stack, token)
    assert_exactly_ten_admitted(rate_stack, token, responses)
    error = next(r for r in responses if r.status_code == 429).json()["error"]
    assert (error["rule"], error["unit"], error["limit"]) == ("rpm", "requests", 10)
    assert error["spent"] + error["reserved"] == 10
    assert error["bucket"] == "user=rpm@example.com"


def test_forty_concurrent_against_ten_rpm_across_two_replicas_on_redis(
    rate_replicas: Stack, issuer: DevIssuer
) -> None:
    assert len(rate_replicas.sidecars) == 2
    token = issuer.mint("rpm2@example.com")
    assert_exactly_ten_admitted(rate_replicas, token, forty_at_once(rate_replicas, token))
    # A decision line is written at the sidecar's next turn of its event loop.
    eventually(
        lambda: all(decided(p.log_path.read_text()) for p in rate_replicas.sidecars) or None,
        what="decision lines from both replicas",
    )


def test_rate_limit_headers_count_down_and_429_names_the_rule(
    rate_stack: Stack, issuer: DevIssuer
) -> None:
    token = issuer.mint("headers@example.com")
    for i in range(10):
        response = call(rate_stack, token, "rpm-model")
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-limit-requests"] == "10"
        assert response.headers["x-ratelimit-remaining-requests"] == str(9 - i)
        assert "x-ratelimit-limit-tokens" not in response.headers
    denied = call(rate_stack, token, "rpm-model")
    assert denied.status_code == 429
    assert denied.headers["x-ratelimit-limit-requests"] == "10"
    assert denied.headers["x-ratelimit-remaining-requests"] == "0"
    # The ten requests were made within the last seconds of a 1-minute window.
    assert 1 <= int(denied.headers["retry-after"]) <= 61
    assert denied.json()["error"]["unit"] == "requests"


def test_token_rule_admits_by_estimate_and_frees_the_difference(
    rate_stack: Stack, issuer: DevIssuer
) -> None:
    token = issuer.mint("tokens@example.com")
    # The estimate fits once, twice only because the first request used far less.
    assert 2 * ESTIMATE > TPM and USED + ESTIMATE <= TPM
    first = call(rate_stack, token, "tok-model", ASKED)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-tokens"] == str(TPM)
    assert first.headers["x-ratelimit-remaining-tokens"] == str(TPM - ESTIMATE)
    assert first.json()["usage"]["completion_tokens"] == ACTUAL.output_tokens
    # Envoy meters after the answer: the next Check sees the usage once it is booked.
    charged(rate_stack, "tokens@example.com", requests=1)
    second = call(rate_stack, token, "tok-model", ASKED)
    assert second.status_code == 200, second.text
    assert second.headers["x-ratelimit-remaining-tokens"] == str(TPM - USED - ESTIMATE)
    charged(rate_stack, "tokens@example.com", requests=2)
    denied = call(rate_stack, token, "tok-model", ASKED)
    assert denied.status_code == 429
    error = denied.json()["error"]
    assert (error["rule"], error["unit"], error["limit"], error["spent"]) == (
        "tpm",
        "tokens",
        TPM,
        2 * USED,
    )
    assert denied.headers["x-ratelimit-remaining-tokens"] == str(TPM - 2 * USED)
    assert int(denied.headers["retry-after"]) >= 1
    # A smaller request still fits what is left.
    assert call(rate_stack, token, "tok-model", 10).status_code == 200


def test_rolling_ten_second_window_readmits_after_it_ages_out(
    rate_stack: Stack, issuer: DevIssuer
) -> None:
    token = issuer.mint("burst@example.com")
    assert call(rate_stack, token, "burst-model").status_code == 200
    assert call(rate_stack, token, "burst-model").status_code == 200
    denied = call(rate_stack, token, "burst-model")
    assert denied.status_code == 429
    retry = int(denied.headers["retry-after"])
    assert 1 <= retry <= 11
    # The real window: wait out the answer's own Retry-After, then it is admitted again.
    time.sleep(retry)
    again = call(rate_stack, token, "burst-model")
    assert again.status_code == 200, again.text


def test_fallback_on_a_token_rule_routes_to_the_cheaper_model(
    rate_stack: Stack, issuer: DevIssuer
) -> None:
    rate_stack.clear_seen()
    token = issuer.mint("fallback@example.com")
    response = call(rate_stack, token, "big-model", 1000)
    assert response.status_code == 200, response.text
    assert response.headers["x-sidecar-model"] == "small-model"
    assert response.headers["x-sidecar-fallback-from"] == "big-model"
    assert rate_stack.seen()[-1]["body"]["model"] == "small-model"
    # Within the rule's tokens, the model asked for is used.
    small = call(rate_stack, token, "big-model", 100)
    assert small.status_code == 200 and "x-sidecar-fallback-from" not in small.headers
    assert rate_stack.seen()[-1]["body"]["model"] == "big-model"


def test_runtime_rules_budgets_and_simulate_speak_each_unit(
    rate_stack: Stack, issuer: DevIssuer
) -> None:
    token = issuer.mint("ivy@example.com", ["night-shift"])
    rule = {
        "name": "night-rpm",
        "requests": 2,
        "window": {"rolling": "1m"},
        "filter": {"group": ["night-shift"]},
        "split": ["user"],
    }
    with rate_stack.admin() as admin:
        created = admin.post("/v1/spend-limits", json=rule)
        assert created.status_code == 201, created.text
        assert created.json()["result"] == {
            **rule,
            "window": {"fixed": None, "rolling": "1m", "timezone": "UTC"},
            "action": "block",
            "alerts": [],
            "source": "runtime",
        }
        listed = {r["name"]: r for r in admin.get("/v1/spend-limits").json()["result"]}
        assert listed["tpm"]["tokens"] == TPM and "budget_usd" not in listed["tpm"]
        assert listed["night-rpm"]["requests"] == 2
        for bad, message in (
            (
                {**rule, "name": "x", "tokens": 5},
                "exactly one of budget_usd, tokens or "
                "requests is required (got tokens and "
                "requests)",
            ),
            ({"name": "x", "window": {"rolling": "1m"}}, "exactly one of"),
            ({**rule, "name": "x", "requests": 1.5}, "requests"),
            ({**rule, "name": "x", "requests": None, "tokens": {"inputs": 3}}, "inputs"),
        ):
            response = admin.post("/v1/spend-limits", json=bad)
            assert response.status_code == 400, bad
            assert message in response.json()["errors"][0]["message"]
        assert [call(rate_stack, token, "rpm-model").status_code for _ in range(3)] == [
            200,
            200,
            429,
        ]
        # Completions are charged in a task after the response: wait for both to land.
        deadline = time.monotonic() + 10
        while True:
            mine = httpx.get(
                rate_stack.admin_url + "/v1/budgets/me",
                params={"model": "rpm-model", "provider": "openai"},
                headers={"authorization": f"Bearer {token}"},
                timeout=10,
            ).json()["result"]
            night = next(b for b in mine if b["rule"] == "night-rpm")
            if night["spent"] == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert (
            night["unit"],
            night["limit"],
            night["spent"],
            night["reserved"],
            night["remaining"],
            night["bucket"],
        ) == ("requests", 2, 2, 0, 0, "user=ivy@example.com")
        rpm = next(b for b in mine if b["rule"] == "rpm")
        assert (rpm["unit"], rpm["limit"]) == ("requests", 10)
        result = admin.post(
            "/v1/simulate",
            json={
                "identity": {"email": "ivy@example.com", "groups": ["night-shift"]},
                "model": "tok-model",
                "provider": "openai",
                "max_tokens": 10,
            },
        ).json()["result"]
        assert result["decision"] == "deny" and result["status"] == 429
        buckets = {b["rule"]: b for b in result["steps"][0]["buckets"]}
        assert (buckets["night-rpm"]["unit"], buckets["night-rpm"]["fits"]) == ("requests", False)
        assert (buckets["tpm"]["unit"], buckets["tpm"]["fits"]) == ("tokens", True)
        assert admin.delete("/v1/spend-limits/night-rpm").status_code == 200


def decided(log: str) -> bool:
    return '"decision": "allow"' in log or '"decision": "deny"' in log
