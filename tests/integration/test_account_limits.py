"""Account-wide limits (the seed APIs) and spend alerts, through a real Envoy."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack

CHAT = "/openai/v1/chat/completions"
# $1 per request exactly (1 output token at $1,000,000 per million).
DOLLAR = {
    "provider": "openai",
    "model": "flat-dollar",
    "input_per_mtok": 0,
    "output_per_mtok": 1000000,
}
HOOK_SECRET = "hook-secret-for-tests"


class Hook:
    def __init__(self) -> None:
        self.received: list[tuple[dict[str, Any], dict[str, str], bytes]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                hook.received.append((json.loads(body), headers, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/spend"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.server.shutdown()


@pytest.fixture(scope="module")
def account_stack(
    tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer, hook: Hook
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("account")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    config = demo_config(
        issuer,
        jwks,
        f"sqlite:///{workdir}/s.db",
        pricing={"unknown_model": "reject", "overrides": [DOLLAR]},
        spend_limits=[
            {
                "name": "team-watch",
                "budget_usd": 4,
                "window": {"fixed": "monthly"},
                "filter": {"group": ["watched"]},
                "split": ["group"],
                "action": "monitor",
                "alerts": [50, 100],
            }
        ],
        alerts={"webhooks": [{"url": hook.url, "secret_env": "SPEND_HOOK_SECRET"}]},
    )
    os.environ["SPEND_HOOK_SECRET"] = HOOK_SECRET
    with running_stack(workdir, issuer, config) as stack:
        yield stack


def dollar(stack: Stack, token: str) -> int:
    return httpx.post(
        stack.envoy_url + CHAT,
        headers={"authorization": f"Bearer {token}"},
        json={
            "model": "flat-dollar",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "x"}],
        },
        timeout=30,
    ).status_code


def test_account_spending_limit_blocks_and_unblocks(
    account_stack: Stack, issuer: DevIssuer
) -> None:
    token = issuer.mint("ann@example.com")
    path = "/accounts/acme/ai-gateway/billing/spending-limit"
    with account_stack.admin() as admin:
        assert admin.get(path).json()["result"] == {"config": None, "enabled": False}
        assert dollar(account_stack, token) == 200  # $1 spent before any limit exists
        for bad in (
            {"amount": 99, "duration": "daily", "strategy": "fixed"},
            {"amount": "100", "duration": "daily", "strategy": "fixed"},
            {"amount": 100.5, "duration": "daily", "strategy": "fixed"},
            {"amount": 100, "duration": "hourly", "strategy": "fixed"},
            {"amount": 100, "duration": "daily", "strategy": "random"},
            {"amount": 100, "duration": "daily"},
            {"amount": 100, "duration": "daily", "strategy": "fixed", "x": 1},
        ):
            response = admin.post(path, json=bad)
            assert response.status_code == 400, bad
            assert response.json()["errors"][0]["message"]
        assert admin.get(path).json()["result"]["enabled"] is False  # nothing changed
        assert (
            admin.post(
                "/accounts/other/ai-gateway/billing/spending-limit",
                json={"amount": 200, "duration": "daily", "strategy": "fixed"},
            ).status_code
            == 404
        )
        assert (
            admin.post(
                path, content=b"{nope", headers={"content-type": "application/json"}
            ).status_code
            == 400
        )
        assert admin.post(path, content=b"{nope").status_code == 415
        # $2 a day: the $1 already spent counts, so one more request fits, then 429.
        set_limit = admin.post(
            path, json={"amount": 200, "duration": "daily", "strategy": "sliding"}
        )
        assert set_limit.status_code == 200, set_limit.text
        assert admin.get(path).json()["result"] == {
            "config": {"amount": 200, "duration": "daily", "strategy": "sliding"},
            "enabled": True,
        }
        assert dollar(account_stack, token) == 200
        assert dollar(account_stack, token) == 429
        assert dollar(account_stack, issuer.mint("other@example.com")) == 429
        assert admin.delete(path).status_code == 200
        assert dollar(account_stack, token) == 200
    assert httpx.get(account_stack.admin_url + path, timeout=10).status_code == 401


def test_spending_caps_hard_cap_blocks_soft_budget_reports(
    account_stack: Stack, issuer: DevIssuer
) -> None:
    caps = "/v1/organizations/billing/spending-caps"
    token = issuer.mint("bea@example.com")
    with account_stack.admin() as admin:
        # Charges land from Envoy's batched access log a moment after each answer.
        deadline = time.monotonic() + 30
        before = admin.get(caps).json()["result"]
        while before["current_spending"] < 300 and time.monotonic() < deadline:
            time.sleep(0.1)
            before = admin.get(caps).json()["result"]
        spent = before["current_spending"]
        assert spent >= 300 and before["percentage_used"] is None
        result = admin.post(
            caps,
            json={
                "monthly_spending_budget": spent * 2,
                "spending_alert_thresholds": [25, 50, 75],
                "spending_alerts_enabled": True,
            },
        ).json()["result"]
        assert result["percentage_used"] == 50.0
        assert result["alert_thresholds_triggered"] == [25, 50]
        assert result["monthly_spending_budget_usd"] == spent * 2 / 100
        assert dollar(account_stack, token) == 200  # soft budget never blocks
        for bad in (
            {"hard_spending_cap": -1},
            {"hard_cap_enabled": "yes"},
            {"spending_alert_thresholds": [101]},
            {"unknown": 1},
            {},
        ):
            assert admin.post(caps, json=bad).status_code == 400, bad
        capped = admin.post(
            caps, json={"hard_spending_cap": spent + 100, "hard_cap_enabled": True}
        ).json()["result"]
        assert capped["hard_spending_cap_usd"] == (spent + 100) / 100
        assert dollar(account_stack, token) == 429
        admin.post(caps, json={"hard_cap_enabled": False})
        assert dollar(account_stack, token) == 200
        cleared = admin.post(
            caps, json={"monthly_spending_budget": None, "hard_spending_cap": None}
        ).json()["result"]
        assert cleared["percentage_used"] is None and cleared["hard_spending_cap"] is None


def test_alerts_fire_once_per_threshold_signed(
    account_stack: Stack, issuer: DevIssuer, hook: Hook
) -> None:
    token = issuer.mint("cid@example.com", ["watched"])
    for _ in range(5):
        assert dollar(account_stack, token) == 200
    deadline = time.monotonic() + 10
    while (
        time.monotonic() < deadline
        and len([r for r in hook.received if r[0]["rule"] == "team-watch"]) < 2
    ):
        time.sleep(0.1)
    time.sleep(0.5)
    ours = [r for r in hook.received if r[0]["rule"] == "team-watch"]
    assert sorted(e["threshold_percent"] for e, _, _ in ours) == [50, 100]
    for event, headers, body in ours:
        assert event["bucket"] == "group=watched"
        sig = headers["x-sidecar-signature"]
        ts, mac = sig.split(",")
        expected = hmac.new(
            HOOK_SECRET.encode(), f"{ts[2:]}.".encode() + body, hashlib.sha256
        ).hexdigest()
        assert mac == f"v1={expected}"
