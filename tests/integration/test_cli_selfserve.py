"""Self-service from the terminal: the real `sidecar` entry point in a subprocess against a
real sidecar, Envoy and fake provider.

Developers see their own budgets and usage after one `sidecar login` (the URL is
remembered); admins manage limits, tokens, the audit trail and the dashboard link with the
admin token or an admin-scoped login; CLI sessions refresh, rotate and revoke.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from devtools import harness_env
from devtools.config import demo_config
from devtools.demo.approve import save_state
from devtools.keys import DevIssuer
from devtools.procs import LOOPBACK, free_port
from devtools.stack import ADMIN_TOKEN, Stack, running_stack

CHAT = "/openai/v1/chat/completions"
USER_CODE = re.compile(r"\b([BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4})\b")
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
# $0.01 per output token: a request's cost is its max_tokens in cents.
FLAT = [
    {"provider": "openai", "model": m, "input_per_mtok": 0, "output_per_mtok": 10000}
    for m in ("flat-cent", "flat-dime")
]
LIMITS = [
    {
        "name": "per-user-daily",
        "budget_usd": 1,
        "window": {"fixed": "daily"},
        "split": ["user"],
        "action": "block",
    },
    {
        "name": "mini-per-user",
        "budget_usd": 0.5,
        "window": {"fixed": "daily"},
        "filter": {"model": ["gpt-4o-mini"]},
        "split": ["user"],
        "action": "block",
    },
    {
        "name": "dime-cap",
        "budget_usd": 0.05,
        "window": {"fixed": "daily"},
        "filter": {"model": ["flat-dime"]},
        "split": ["user"],
        "action": "block",
    },
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("selfserve")
    jwks = issuer.write_jwks(workdir / "jwks.json")
    port = free_port()
    config = demo_config(
        issuer,
        str(jwks),
        f"sqlite:///{workdir}/sidecar.db",
        spend_limits=LIMITS,
        pricing={"unknown_model": "reject", "overrides": FLAT},
    )
    config["identity"]["device_login"] = {
        "enabled": True,
        "token_ttl": "12h",
        "public_url": f"http://{LOOPBACK}:{port}",
    }
    with running_stack(workdir, issuer, config, http_port=port) as running:
        yield running


def run(
    home: Path, *args: str, admin: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed `sidecar` entry point, with its own config dir and no ambient URL."""
    full = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SIDECAR_URL", "SIDECAR_ADMIN_TOKEN", "SIDECAR_TOKEN")
    }
    full["XDG_CONFIG_HOME"] = str(home)
    if admin:
        full["SIDECAR_ADMIN_TOKEN"] = ADMIN_TOKEN
    full.update(env or {})
    entry = Path(sys.executable).with_name("sidecar")
    return subprocess.run([str(entry), *args], capture_output=True, text=True, timeout=60, env=full)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result.stdout


def person(issuer: DevIssuer, email: str, groups: list[str]) -> dict[str, str]:
    return {"cookie": f"CF_Authorization={issuer.mint(email, groups)}"}


def approval_page(url: str, headers: dict[str, str], code: str) -> httpx.Response:
    return httpx.get(f"{url}/device", params={"user_code": code}, headers=headers, timeout=20)


def approve(url: str, headers: dict[str, str], code: str) -> None:
    page = approval_page(url, headers, code)
    assert page.status_code == 200, page.text
    match = CSRF.search(page.text)
    assert match, page.text
    done = httpx.post(
        f"{url}/device/approve",
        headers=headers,
        timeout=20,
        data={"user_code": code, "action": "approve", "csrf_token": match.group(1)},
    )
    assert done.status_code == 200, done.text


class LoginRun:
    """`sidecar login [--admin] URL` running in the background until its code is shown."""

    def __init__(self, home: Path, url: str, *extra: str) -> None:
        entry = Path(sys.executable).with_name("sidecar")
        env = {k: v for k, v in os.environ.items() if k != "SIDECAR_URL"}
        self.proc = subprocess.Popen(
            [str(entry), "login", *extra, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "XDG_CONFIG_HOME": str(home)},
        )
        self.lines: list[str] = []
        stdout = self.proc.stdout
        assert stdout is not None
        self.reader = threading.Thread(
            target=lambda: self.lines.extend(iter(stdout.readline, "")), daemon=True
        )
        self.reader.start()

    def code(self) -> str:
        deadline = time.monotonic() + 30
        while True:
            found = [m.group(1) for line in self.lines if (m := USER_CODE.search(line))]
            if found:
                return found[0]
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, f"no user code printed: {self.lines}"
            time.sleep(0.1)

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=90)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(timeout=5)
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()


def login(
    stack: Stack, issuer: DevIssuer, home: Path, email: str, groups: list[str], *extra: str
) -> dict[str, Any]:
    running = LoginRun(home, stack.admin_url, *extra)
    approve(stack.admin_url, person(issuer, email, groups), running.code())
    assert running.finish() == 0
    name = "admin-credentials.json" if "--admin" in extra else "credentials.json"
    return dict(json.loads((home / "llm-sidecar" / name).read_text()))


def chat(
    stack: Stack, headers: dict[str, str], model: str = "gpt-4o-mini", max_tokens: int = 8
) -> httpx.Response:
    return httpx.post(
        stack.envoy_url + CHAT,
        timeout=20,
        headers=headers,
        json={
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hello"}],
        },
    )


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def alice(
    stack: Stack, issuer: DevIssuer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    home = tmp_path_factory.mktemp("alice")
    return home, login(stack, issuer, home, "alice@example.com", ["ml"])


def test_budgets_list_every_bucket_of_mine_as_table_and_json(
    stack: Stack, alice: tuple[Path, dict[str, Any]]
) -> None:
    home, credential = alice
    # No --url and no $SIDECAR_URL: the server comes from the login.
    before = json.loads(ok(run(home, "budgets", "--json")))
    rules = {(r["rule"], r["bucket"]) for r in before}
    # The model-filtered rule is listed before any spend, for the model its filter names.
    assert ("per-user-daily", "user=alice@example.com") in rules
    assert ("mini-per-user", "user=alice@example.com") in rules
    assert chat(stack, bearer(credential["access_token"])).status_code == 200
    rows = json.loads(ok(run(home, "budgets", "--json")))
    mine = {r["rule"]: r for r in rows}
    assert set(mine) >= {"per-user-daily", "mini-per-user", "dime-cap"}
    for row in rows:
        for key in ("limit", "spent", "reserved", "remaining"):
            assert isinstance(row[key], int | float), (key, row)
    assert mine["mini-per-user"]["spent"] > 0 and mine["mini-per-user"]["limit"] == 0.5
    assert mine["dime-cap"]["spent"] == 0
    table = ok(run(home, "budgets"))
    header = table.splitlines()[0].split()
    assert header[:3] == ["RULE", "BUCKET", "WINDOW"] and "REMAINING" in header
    assert "mini-per-user" in table and re.search(r"\[[#.]{10}\]", table)
    assert re.search(r"\b\d+h \d+m\b|\b\d+m\b", table), table
    only = json.loads(ok(run(home, "budgets", "--model", "flat-dime", "--json")))
    assert {r["rule"] for r in only} == {"per-user-daily", "dime-cap"}


def test_usage_me_shows_only_my_rows_without_admin(
    stack: Stack, issuer: DevIssuer, alice: tuple[Path, dict[str, Any]]
) -> None:
    home, credential = alice
    assert chat(stack, bearer(issuer.mint("bob@example.com", ["ml"]))).status_code == 200
    assert chat(stack, bearer(credential["access_token"])).status_code == 200
    mine = json.loads(ok(run(home, "usage", "--me", "--by", "user,model", "--json")))
    assert {r["user"] for r in mine["rows"]} == {"alice@example.com"}
    assert mine["total"]["requests"] >= 1
    everyone = json.loads(
        ok(run(home, "usage", "--by", "user", "--json", "--url", stack.admin_url, admin=True))
    )
    assert {"alice@example.com", "bob@example.com"} <= {r["user"] for r in everyone["rows"]}
    refused = run(home, "usage", "--json")
    assert refused.returncode == 1 and "sidecar login --admin" in refused.stderr
    bob = bearer(issuer.mint("bob@example.com", ["ml"]))
    direct = httpx.get(
        stack.admin_url + "/v1/usage/me", timeout=10, params={"group_by": "user"}, headers=bob
    )
    assert direct.status_code == 200
    assert {r["user"] for r in direct.json()["result"]} == {"bob@example.com"}


def test_limits_crud_from_the_cli(stack: Stack, tmp_path: Path) -> None:
    env = {"SIDECAR_URL": stack.admin_url}
    created = json.loads(
        ok(
            run(
                tmp_path,
                "limits",
                "create",
                "ml-team",
                "--budget-usd",
                "25",
                "--window",
                "monthly",
                "--filter",
                "group=ml",
                "--split",
                "user",
                "--alerts",
                "50,90",
                "--json",
                admin=True,
                env=env,
            )
        )
    )
    assert created["budget_usd"] == 25 and created["window"]["fixed"] == "monthly"
    assert created["filter"] == {"group": ["ml"]} and created["source"] == "runtime"
    listed = ok(run(tmp_path, "limits", "list", admin=True, env=env))
    assert re.search(r"^ml-team\s+runtime\s+\$25", listed, re.M), listed
    assert "per-user-daily" in listed
    updated = json.loads(
        ok(
            run(
                tmp_path,
                "limits",
                "update",
                "ml-team",
                "--budget-usd",
                "30",
                "--window",
                "24h",
                "--json",
                admin=True,
                env=env,
            )
        )
    )
    assert updated["budget_usd"] == 30 and updated["window"]["rolling"] == "24h"
    assert updated["window"]["fixed"] is None
    assert updated["filter"] == {"group": ["ml"]}  # kept
    shown = json.loads(
        ok(run(tmp_path, "limits", "show", "ml-team", "--json", admin=True, env=env))
    )
    assert shown == updated
    ok(run(tmp_path, "limits", "delete", "ml-team", admin=True, env=env))
    gone = run(tmp_path, "limits", "show", "ml-team", admin=True, env=env)
    assert gone.returncode == 1 and "404" in gone.stderr
    readonly = run(tmp_path, "limits", "delete", "per-user-daily", admin=True, env=env)
    assert readonly.returncode == 1 and "read-only" in readonly.stderr


def test_limits_in_tokens_and_requests_from_the_cli(
    stack: Stack, tmp_path: Path, alice: tuple[Path, dict[str, Any]]
) -> None:
    env = {"SIDECAR_URL": stack.admin_url}
    created = json.loads(
        ok(
            run(
                tmp_path,
                "limits",
                "create",
                "ml-tpm",
                "--tokens",
                "200000",
                "--window",
                "1m",
                "--filter",
                "group=ml",
                "--split",
                "user",
                "--json",
                admin=True,
                env=env,
            )
        )
    )
    assert created["tokens"] == 200_000 and "budget_usd" not in created
    assert created["window"]["rolling"] == "1m"
    listed = ok(run(tmp_path, "limits", "list", admin=True, env=env))
    assert re.search(r"^ml-tpm\s+runtime\s+200,000 tokens\s+rolling 1m", listed, re.M), listed
    both = run(
        tmp_path,
        "limits",
        "create",
        "x",
        "--tokens",
        "5",
        "--requests",
        "5",
        "--window",
        "1m",
        admin=True,
        env=env,
    )
    assert both.returncode == 1 and "one of --budget-usd, --tokens or --requests" in both.stderr
    # Switching the unit replaces the old one.
    updated = json.loads(
        ok(
            run(
                tmp_path,
                "limits",
                "update",
                "ml-tpm",
                "--requests",
                "600",
                "--json",
                admin=True,
                env=env,
            )
        )
    )
    assert updated["requests"] == 600 and "tokens" not in updated
    home, _ = alice
    mine = json.loads(ok(run(home, "budgets", "--json")))
    rpm = next(r for r in mine if r["rule"] == "ml-tpm")
    assert (rpm["unit"], rpm["limit"]) == ("requests", 600)
    assert re.search(r"^ml-tpm\s.*\b600 req\b", ok(run(home, "budgets")), re.M)
    ok(run(tmp_path, "limits", "delete", "ml-tpm", admin=True, env=env))


def test_token_with_its_own_budget_unique_names_rotate_and_revoke_by_name(
    stack: Stack, tmp_path: Path
) -> None:
    env = {"SIDECAR_URL": stack.admin_url}
    made = json.loads(
        ok(
            run(
                tmp_path,
                "tokens",
                "create",
                "nightly-bot",
                "--group",
                "ml",
                "--expires",
                "30d",
                "--budget-usd",
                "0.02",
                "--window",
                "daily",
                "--json",
                admin=True,
                env=env,
            )
        )
    )
    assert made["spend_limit"]["name"] == "token-nightly-bot"
    assert made["spend_limit"]["filter"] == {"token": ["nightly-bot"]}
    headers = {
        "cf-access-client-id": made["client_id"],
        "cf-access-client-secret": made["client_secret"],
    }
    # $0.01 each: two fit the token's $0.02, the third is refused by its own limit.
    answers = [chat(stack, headers, "flat-cent", 1) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429], answers[-1].text
    assert answers[2].json()["error"]["rule"] == "token-nightly-bot"

    again = run(tmp_path, "tokens", "create", "nightly-bot", admin=True, env=env)
    assert again.returncode == 1 and "409" in again.stderr and "already exists" in again.stderr
    listed = ok(run(tmp_path, "tokens", "list", admin=True, env=env))
    line = next(x for x in listed.splitlines() if x.startswith("nightly-bot"))
    assert "active" in line and "UTC" in line  # expiry and last use are shown
    assert "LAST USED" in listed.splitlines()[0]

    rotated = json.loads(
        ok(run(tmp_path, "tokens", "rotate", "nightly-bot", "--json", admin=True, env=env))
    )
    assert rotated["client_id"] == made["client_id"]
    assert rotated["client_secret"] != made["client_secret"]
    old = chat(stack, headers, "gpt-4o-mini")
    assert old.status_code == 401
    headers["cf-access-client-secret"] = rotated["client_secret"]
    # The new secret authenticates (and its budget, already spent, still holds).
    new = chat(stack, headers, "flat-cent", 1)
    assert new.status_code == 429 and new.json()["error"]["rule"] == "token-nightly-bot"

    ok(run(tmp_path, "tokens", "revoke", "nightly-bot", admin=True, env=env))
    assert chat(stack, headers, "flat-cent", 1).status_code == 401
    # The name is free again once its token is revoked.
    ok(run(tmp_path, "tokens", "create", "nightly-bot", admin=True, env=env))


def test_request_exceeding_a_whole_limit_says_so_without_retry_after(
    stack: Stack, issuer: DevIssuer
) -> None:
    response = chat(stack, bearer(issuer.mint("carol@example.com", ["ml"])), "flat-dime", 10)
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "request_exceeds_limit" and error["rule"] == "dime-cap"
    assert error["estimate"] == 0.1 and error["limit"] == 0.05
    assert "max_tokens" in error["message"]
    assert "retry-after" not in response.headers
    # A request that merely does not fit right now still gets Retry-After.
    token = bearer(issuer.mint("carol@example.com", ["ml"]))
    answers = [chat(stack, token, "flat-dime", 3) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 429]
    assert "retry-after" in answers[1].headers
    assert answers[1].json()["error"].get("code") != "request_exceeds_limit"


def test_refresh_rotates_and_logout_revokes(
    stack: Stack, issuer: DevIssuer, tmp_path: Path
) -> None:
    home = tmp_path / "dana"
    first = login(stack, issuer, home, "dana@example.com", ["ml"])
    assert first["refresh_token"] and first["url"] == stack.admin_url
    path = home / "llm-sidecar" / "credentials.json"
    assert path.stat().st_mode & 0o777 == 0o600
    # Near expiry: `sidecar token` renews silently, with a new refresh token.
    path.write_text(json.dumps({**first, "expires_at": time.time() + 60}))
    renewed = ok(run(home, "token")).strip()
    second = json.loads(path.read_text())
    assert renewed == second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert chat(stack, bearer(renewed)).status_code == 200
    # The old refresh token works once only; presented again, it ends the whole session.
    replay = httpx.post(
        stack.admin_url + "/device/token",
        timeout=10,
        data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
    )
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    revoked = chat(stack, bearer(renewed))
    assert revoked.status_code == 401
    assert "run `sidecar login`" in revoked.json()["error"]["message"]

    third = login(stack, issuer, home, "dana@example.com", ["ml"])
    assert chat(stack, bearer(third["access_token"])).status_code == 200
    ok(run(home, "logout"))
    assert not path.exists()
    after = chat(stack, bearer(third["access_token"]))
    assert after.status_code == 401 and "sidecar login" in after.json()["error"]["message"]
    refresh = httpx.post(
        stack.admin_url + "/device/token",
        timeout=10,
        data={"grant_type": "refresh_token", "refresh_token": third["refresh_token"]},
    )
    assert refresh.status_code == 400
    plain = run(home, "budgets")
    assert plain.returncode == 1 and "sidecar login" in plain.stderr


def test_admin_login_needs_an_admin_approver_and_lasts_an_hour(
    stack: Stack, issuer: DevIssuer, tmp_path: Path
) -> None:
    home = tmp_path / "root"
    running = LoginRun(home, stack.admin_url, "--admin")
    code = running.code()
    assert any("ADMIN" in line for line in running.lines)
    member = person(issuer, "bob@example.com", ["ml"])
    refused = approval_page(stack.admin_url, member, code)
    assert refused.status_code == 403 and "ADMIN" in refused.text
    assert "csrf_token" not in refused.text
    root = person(issuer, "root@example.com", ["platform-admins"])
    page = approval_page(stack.admin_url, root, code)
    assert page.status_code == 200 and 'class="admin"' in page.text
    assert "ADMIN access" in page.text and "1 hour" in page.text
    # A forged approval by the member (with a valid form token of their own) is refused.
    csrf = CSRF.search(page.text)
    assert csrf is not None
    forged = httpx.post(
        f"{stack.admin_url}/device/approve",
        headers=member,
        timeout=20,
        data={"user_code": code, "action": "approve", "csrf_token": csrf.group(1)},
    )
    assert forged.status_code == 403
    approve(stack.admin_url, root, code)
    assert running.finish() == 0
    stored = json.loads((home / "llm-sidecar" / "admin-credentials.json").read_text())
    claims = jwt.decode(stored["access_token"], options={"verify_signature": False})
    assert claims["scope"] == "admin" and claims["exp"] - claims["iat"] <= 3600
    assert "refresh_token" not in stored
    # Admin commands work with no admin token in the environment.
    listed = json.loads(ok(run(home, "limits", "list", "--json")))
    assert "per-user-daily" in {r["name"] for r in listed}
    # A plain CLI token of the same admin is still not an admin.
    plain = login(stack, issuer, home, "root@example.com", ["platform-admins"])
    denied = httpx.get(
        stack.admin_url + "/v1/spend-limits", timeout=10, headers=bearer(plain["access_token"])
    )
    assert denied.status_code == 403
    # Revoking the admin session ends the admin token at once.
    session = claims["sid"]
    with stack.admin() as admin:
        assert admin.delete(f"/v1/cli-sessions/{session}").status_code == 200
    after = httpx.get(
        stack.admin_url + "/v1/spend-limits", timeout=10, headers=bearer(stored["access_token"])
    )
    assert after.status_code == 401


def test_dashboard_link_is_single_use_and_sets_a_strict_cookie(
    stack: Stack, tmp_path: Path
) -> None:
    env = {"SIDECAR_URL": stack.admin_url}
    link = json.loads(ok(run(tmp_path, "dashboard", "--json", admin=True, env=env)))
    assert link["expires_in"] == 60 and link["url"].startswith(stack.admin_url)
    first = httpx.get(link["url"], timeout=10)
    assert first.status_code == 303 and first.headers["location"] == "/dashboard"
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    value = first.cookies["sidecar_dashboard"]
    page = httpx.get(
        stack.admin_url + "/dashboard", cookies={"sidecar_dashboard": value}, timeout=10
    )
    assert page.status_code == 200 and "LLM spend" in page.text
    # The session only opens the dashboard, not the admin API.
    api = httpx.get(
        stack.admin_url + "/v1/spend-limits", timeout=10, cookies={"sidecar_dashboard": value}
    )
    assert api.status_code == 401
    second = httpx.get(link["url"], timeout=10)
    assert second.status_code == 403 and "sidecar_dashboard" not in second.cookies
    text = ok(run(tmp_path, "dashboard", admin=True, env=env))
    assert "/dashboard/open?code=" in text and "works once" in text


def test_every_admin_write_is_audited(
    stack: Stack, tmp_path: Path, alice: tuple[Path, dict[str, Any]]
) -> None:
    env = {"SIDECAR_URL": stack.admin_url}
    ok(
        run(
            tmp_path,
            "limits",
            "create",
            "audited",
            "--budget-usd",
            "5",
            "--window",
            "daily",
            admin=True,
            env=env,
        )
    )
    ok(run(tmp_path, "limits", "update", "audited", "--budget-usd", "6", admin=True, env=env))
    ok(run(tmp_path, "limits", "delete", "audited", admin=True, env=env))
    ok(run(tmp_path, "tokens", "create", "audited-bot", admin=True, env=env))
    ok(run(tmp_path, "tokens", "rotate", "audited-bot", admin=True, env=env))
    ok(run(tmp_path, "tokens", "revoke", "audited-bot", admin=True, env=env))
    base = "/accounts/acme/ai-gateway/billing/spending-limit"
    sid = jwt.decode(alice[1]["access_token"], options={"verify_signature": False})["sid"]
    with stack.admin() as admin:
        assert (
            admin.post(
                base, json={"amount": 10000, "duration": "monthly", "strategy": "fixed"}
            ).status_code
            == 200
        )
        assert admin.delete(base).status_code == 200
        assert (
            admin.post(
                "/v1/organizations/billing/spending-caps", json={"monthly_spending_budget": 50000}
            ).status_code
            == 200
        )
        assert admin.delete(f"/v1/cli-sessions/{sid}").status_code == 200
    entries = json.loads(
        ok(run(tmp_path, "audit", "--limit", "200", "--json", admin=True, env=env))
    )
    actions = [e["action"] for e in entries]
    for action in (
        "spend_limit.create",
        "spend_limit.update",
        "spend_limit.delete",
        "service_token.create",
        "service_token.rotate",
        "service_token.revoke",
        "account_limit.set",
        "account_limit.delete",
        "spending_caps.set",
        "cli_session.revoke",
    ):
        assert action in actions, action
    update = next(
        e for e in entries if e["action"] == "spend_limit.update" and e["target"] == "audited"
    )
    assert update["who"] == "admin-token" and update["at"].endswith("Z")
    assert update["before"]["budget_usd"] == 5 and update["after"]["budget_usd"] == 6
    revoke = next(e for e in entries if e["action"] == "service_token.revoke")
    assert revoke["before"]["revoked_at"] is None and revoke["after"]["revoked_at"]
    assert all("secret_hash" not in json.dumps(e) for e in entries)
    table = ok(run(tmp_path, "audit", admin=True, env=env))
    assert table.splitlines()[0].split() == ["WHEN", "WHO", "ACTION", "TARGET"]
    with stack.admin() as admin:
        page = admin.get("/dashboard").text
    assert 'data-action="cli_session.revoke"' in page


def test_demo_approves_a_login_as_its_test_person(
    stack: Stack, issuer: DevIssuer, tmp_path: Path
) -> None:
    # The demo's layout: its dev issuer's key and the running stack's URL under ./.demo.
    workdir = tmp_path / ".demo"
    workdir.mkdir()
    (workdir / "issuer-key.pem").write_bytes(
        issuer.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (workdir / "issuer-kid").write_text(issuer.kid)
    save_state(workdir, stack.admin_url)
    home = tmp_path / "home"
    running = LoginRun(home, stack.admin_url)
    code = running.code()
    # As scripts/demo.sh runs it, but from the demo's directory: harness_env finds devtools.
    demo = [sys.executable, "-m", "devtools.demo", "--approve", code]
    approved = subprocess.run(
        demo, cwd=tmp_path, env=harness_env(), capture_output=True, text=True, timeout=60
    )
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert "alice@example.com" in approved.stdout
    assert running.finish() == 0
    assert json.loads(ok(run(home, "budgets", "--json")))
    again = subprocess.run(
        demo, cwd=tmp_path, env=harness_env(), capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 1 and "409" in again.stdout


def test_cli_help_and_version(tmp_path: Path) -> None:
    version = ok(run(tmp_path, "--version"))
    assert version.startswith("sidecar ")
    top = ok(run(tmp_path, "--help"))
    assert "sidecar login URL" in top and "SIDECAR_URL" in top
    assert "--budget-usd" in ok(run(tmp_path, "tokens", "create", "--help"))
