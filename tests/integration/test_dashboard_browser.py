"""The dashboard in headless Chromium (Debian's package, driven by Playwright) after real
traffic through Envoy: it loads without console errors, its totals equal `/v1/usage`'s, it
lists the full budget and the recent 429s and fallbacks, and a screenshot is kept."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import sync_playwright

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CHAT = "/openai/v1/chat/completions"
FLAT = {"provider": "openai", "model": "flat-cent", "input_per_mtok": 0, "output_per_mtok": 10000}
LIMITS = [
    {
        "name": "per-user-nickel",
        "budget_usd": 0.05,
        "window": {"fixed": "daily"},
        "filter": {"model": ["flat-*"]},
        "split": ["user"],
        "action": "block",
        "alerts": [50, 90, 100],
    },
    {
        "name": "team-monthly",
        "budget_usd": 5,
        "window": {"fixed": "monthly"},
        "split": ["group"],
        "action": "monitor",
        "alerts": [50, 75, 90],
    },
    {
        "name": "gpt4o-fallback",
        "budget_usd": 0.000001,
        "window": {"rolling": "1h"},
        "filter": {"model": ["gpt-4o"]},
        "action": "fallback",
    },
]
# (email, groups, model, max_tokens, calls)
TRAFFIC: list[tuple[str, list[str], str, int, int]] = [
    ("alice@example.com", ["ml"], "flat-cent", 1, 7),  # 5 admitted, then 429s
    ("bob@example.com", ["ml", "search"], "flat-cent", 1, 3),
    ("bob@example.com", ["ml", "search"], "gpt-4o-mini", 40, 4),
    ("carol@example.com", ["search"], "claude-haiku-4-5", 60, 3),
    ("dan@example.com", ["interns"], "gpt-4o-mini", 20, 2),
    ("erin@example.com", [], "gpt-4o", 1, 2),  # fallback to flat-cent
]


@pytest.fixture(scope="module")
def traffic_stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("dashboard")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    config = demo_config(
        issuer,
        jwks,
        f"sqlite:///{workdir}/s.db",
        spend_limits=LIMITS,
        fallbacks={"gpt-4o": [{"model": "flat-cent", "provider": "openai"}]},
        pricing={"unknown_model": "reject", "overrides": [FLAT]},
    )
    with running_stack(workdir, issuer, config) as stack:
        for email, groups, model, max_tokens, calls in TRAFFIC:
            token = issuer.mint(email, groups)
            path = "/anthropic/v1/messages" if model.startswith("claude") else CHAT
            for _ in range(calls):
                httpx.post(
                    stack.envoy_url + path,
                    timeout=30,
                    headers={"authorization": f"Bearer {token}"},
                    json={
                        "model": model,
                        "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": "hello there"}],
                    },
                )
        # A provider error: $0, shown as an error.
        failed = httpx.post(
            stack.envoy_url + CHAT,
            timeout=30,
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={
                "authorization": f"Bearer {issuer.mint('fay@example.com', ['ml'])}",
                "x-fake-status": "500",
            },
        )
        assert failed.status_code == 500
        yield stack


def usage(stack: Stack, **params: Any) -> list[dict[str, Any]]:
    with stack.admin() as admin:
        response = admin.get("/v1/usage", params=params)
    assert response.status_code == 200, response.text
    return list(response.json()["result"])


def micros(usd: float) -> int:
    return round(usd * 1_000_000)


def wait_for_recent(stack: Stack, count: int) -> None:
    # Refusals are recorded off the request path, a moment after the answer.
    deadline = time.monotonic() + 10
    with stack.admin() as admin:
        while time.monotonic() < deadline:
            page = admin.get("/dashboard").text
            if page.count('class="recent"') >= count:
                return
            time.sleep(0.2)
    raise AssertionError("recent refusals did not show up")


def test_dashboard_in_chromium(traffic_stack: Stack, issuer: DevIssuer, tmp_path: Path) -> None:
    stack = traffic_stack
    wait_for_recent(stack, 4)  # 2 x 429 and 2 fallbacks
    admin_jwt = issuer.mint("root@example.com", ["platform-admins"])
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=120_000)
        try:
            context = browser.new_context(viewport={"width": 1360, "height": 900})
            context.add_cookies(
                [{"name": "CF_Authorization", "value": admin_jwt, "url": stack.admin_url}]
            )
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            response = page.goto(stack.admin_url + "/dashboard", wait_until="load", timeout=60_000)
            assert response is not None and response.status == 200
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            start = page.get_attribute("#range", "data-start")
            end = page.get_attribute("#range", "data-end")
            total = int(page.get_attribute("#total-cost", "data-micros") or "-1")
            requests = page.inner_text("#total-requests").replace(",", "")
            provider_errors = page.inner_text("#total-errors").replace(",", "")
            legend = {
                (li.get_attribute("data-key") or ""): int(li.get_attribute("data-micros") or 0)
                for li in page.query_selector_all('#chart-model li[data-dim="model"]')
            }
            buckets = {
                (row.get_attribute("data-rule"), row.get_attribute("data-bucket")): (
                    row.get_attribute("data-used-micros"),
                    row.get_attribute("data-limit-micros"),
                )
                for row in page.query_selector_all("#buckets tr[data-rule]")
            }
            reasons = [
                row.get_attribute("data-reason")
                for row in page.query_selector_all("#recent tr.recent")
            ]
            svg_bars = len(page.query_selector_all("svg.chart rect"))
        finally:
            browser.close()
    assert errors == []
    # The same totals as the usage API over the page's own range.
    (api_total,) = usage(stack, start=start, end=end)
    assert total == micros(api_total["cost_usd"]) and total > 0
    assert int(requests) == api_total["requests"]
    assert int(provider_errors) == api_total["errors"] == 1
    by_model = {
        r["model"]: micros(r["cost_usd"])
        for r in usage(stack, group_by="model", start=start, end=end)
    }
    assert legend == by_model
    assert {"flat-cent", "gpt-4o-mini", "claude-haiku-4-5"} <= set(legend)
    assert svg_bars >= 4
    # Alice's bucket is full; the group buckets of the monitor rule are listed too.
    assert buckets[("per-user-nickel", "user=alice@example.com")] == ("50000", "50000")
    assert ("team-monthly", "group=search") in buckets
    assert reasons.count("spend_limit_exceeded") == 2 and reasons.count("fallback") == 2


def test_dashboard_refuses_non_admins(traffic_stack: Stack, issuer: DevIssuer) -> None:
    url = traffic_stack.admin_url + "/dashboard"
    anonymous = httpx.get(url, timeout=10)
    assert anonymous.status_code == 401 and "text/html" in anonymous.headers["content-type"]
    member = httpx.get(
        url, timeout=10, cookies={"CF_Authorization": issuer.mint("bob@example.com", ["ml"])}
    )
    assert member.status_code == 403
    with traffic_stack.admin() as admin:
        assert admin.get("/dashboard", params={"window": "week"}).status_code == 400
        assert admin.get("/dashboard", params={"bogus": "1"}).status_code == 400
        hourly = admin.get("/dashboard", params={"window": "hour"})
        assert hourly.status_code == 200
        assert "script" not in hourly.headers["content-security-policy"]


def test_dashboard_filters_and_csv_export_in_chromium(
    traffic_stack: Stack, issuer: DevIssuer, tmp_path: Path
) -> None:
    stack = traffic_stack
    admin_jwt = issuer.mint("root@example.com", ["platform-admins"])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=120_000)
        try:
            context = browser.new_context(accept_downloads=True)
            context.add_cookies(
                [{"name": "CF_Authorization", "value": admin_jwt, "url": stack.admin_url}]
            )
            page = context.new_page()
            page.goto(stack.admin_url + "/dashboard", wait_until="load", timeout=60_000)
            page.select_option("#filter-window", "hour")
            page.fill("#filter-user", "bob@example.com")
            page.fill("#filter-model", "gpt-4o-mini")
            with page.expect_navigation():
                page.click("#apply")
            assert "user=bob%40example.com" in page.url and "window=hour" in page.url
            assert page.input_value("#filter-user") == "bob@example.com"
            start = page.get_attribute("#range", "data-start")
            end = page.get_attribute("#range", "data-end")
            total = int(page.get_attribute("#total-cost", "data-micros") or "-1")
            requests = int(page.inner_text("#total-requests").replace(",", ""))
            legend = {
                li.get_attribute("data-key")
                for li in page.query_selector_all('#chart-user li[data-dim="user"]')
            }
            with page.expect_download() as info:
                page.click("#csv")
            saved = tmp_path / "spend.csv"
            info.value.save_as(saved)
        finally:
            browser.close()
    expected = [
        r
        for r in usage(stack, group_by="user,model", start=start, end=end)
        if r["user"] == "bob@example.com" and r["model"] == "gpt-4o-mini"
    ]
    assert len(expected) == 1 and total == micros(expected[0]["cost_usd"]) and total > 0
    assert requests == expected[0]["requests"] == 4
    assert legend == {"bob@example.com"}
    lines = saved.read_text().splitlines()
    assert lines[0] == (
        "window_start,user,model,provider,cost_usd,requests,input_tokens,output_tokens"
    )
    rows = [line.split(",") for line in lines[1:]]
    assert rows and all(r[1] == "bob@example.com" and r[2] == "gpt-4o-mini" for r in rows)
    assert sum(micros(float(r[4])) for r in rows) == total
    assert sum(int(r[5]) for r in rows) == requests
