"""Device login end to end: the real CLI, the approval page, and minted tokens through Envoy.

Two sidecar replicas share one store: the CLI talks to the first, people approve on the
second, and Envoy spreads checks over both, so every step is answered by "any replica".
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from devtools.config import DEMO_PROVIDER_KEYS, demo_config
from devtools.keys import DevIssuer
from devtools.procs import LOOPBACK, free_port
from devtools.stack import DEMO_SECRET_KEY, Stack, running_stack
from sidecar.identity.device import GRANT_TYPE, GUESS_LIMIT, INTERVAL, Approver, DeviceLogin
from sidecar.identity.secret_box import SecretBox
from sidecar.store.factory import open_store

CHAT = "/openai/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
USER_CODE = re.compile(r"\b([BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4})\b")
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("device")
    jwks = issuer.write_jwks(workdir / "jwks.json")
    port = free_port()
    # Two sidecar processes on the one file.
    config = demo_config(
        issuer, str(jwks), {"url": f"sqlite:///{workdir}/sidecar.db", "shared": True}
    )
    config["identity"]["device_login"] = {
        "enabled": True,
        "token_ttl": "1h",
        "public_url": f"http://{LOOPBACK}:{port}",
    }
    # The tests stand in for a proxy on loopback that forwards each client's address.
    config["http"] = {"trusted_proxies": ["127.0.0.1/32"]}
    with running_stack(workdir, issuer, config, extra_sidecars=1, http_port=port) as running:
        assert running.admin_url == f"http://{LOOPBACK}:{port}"
        yield running


def replica_url(stack: Stack) -> str:
    argv = stack.sidecars[1].argv
    return f"http://{argv[argv.index('--http') + 1]}"


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_CONFIG_HOME": str(home)},
    )


def person(issuer: DevIssuer, email: str, groups: list[str] | None = None) -> dict[str, str]:
    # As a browser behind Access sends it: the CF_Authorization cookie.
    return {"cookie": f"CF_Authorization={issuer.mint(email, groups)}"}


def new_code(url: str) -> dict[str, object]:
    response = httpx.post(f"{url}/device/code", data={"client_id": "tests"}, timeout=20)
    assert response.status_code == 200, response.text
    return dict(response.json())


def poll(url: str, device_code: object) -> httpx.Response:
    return httpx.post(
        f"{url}/device/token",
        timeout=20,
        data={"grant_type": GRANT_TYPE, "device_code": str(device_code)},
    )


def decide(url: str, headers: dict[str, str], code: str, action: str = "approve") -> str:
    page = httpx.get(f"{url}/device", params={"user_code": code}, headers=headers, timeout=20)
    assert page.status_code == 200, page.text
    match = CSRF.search(page.text)
    assert match, page.text
    done = httpx.post(
        f"{url}/device/approve",
        headers=headers,
        timeout=20,
        data={"user_code": code, "action": action, "csrf_token": match.group(1)},
    )
    assert done.status_code == 200, done.text
    return page.text


def through_envoy(stack: Stack, token: str) -> httpx.Response:
    return httpx.post(
        stack.envoy_url + CHAT, json=BODY, timeout=20, headers={"authorization": f"Bearer {token}"}
    )


async def minted(stack: Stack, email: str, ttl: int, age: float = 0) -> str:
    """A token signed with the stack's own key, as if issued `age` seconds ago."""
    store = await open_store(f"sqlite:///{stack.workdir}/sidecar.db")
    try:
        login = DeviceLogin(
            store,
            stack.admin_url,
            box=SecretBox(DEMO_SECRET_KEY, "demo"),
            clock=lambda: time.time() - age,
        )
        return await login.mint(Approver("u-" + email, email, ("ml",), "tests"), ttl)
    finally:
        await store.close()


def test_cli_login_then_the_token_works_through_envoy(
    stack: Stack, issuer: DevIssuer, tmp_path: Path
) -> None:
    home = tmp_path / "config"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "login", stack.admin_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "XDG_CONFIG_HOME": str(home)},
    )
    lines: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    # A thread reads stdout so the test can wait for the code with a deadline.
    reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not any(USER_CODE.search(line) for line in lines):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, f"no user code printed: {lines}"
            time.sleep(0.1)
        code = next(m.group(1) for line in lines if (m := USER_CODE.search(line)))
        assert any(f"{stack.admin_url}/device?user_code={code}" in line for line in lines)
        page = decide(replica_url(stack), person(issuer, "alice@example.com", ["ml"]), code)
        for shown in ("alice@example.com", code, "sidecar-cli/", "for 1 hour", "127.0.0.1"):
            assert shown in page, shown
        proc.wait(timeout=90)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    path = home / "llm-sidecar" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    stored = json.loads(path.read_text())
    assert stored["email"] == "alice@example.com" and stored["url"] == stack.admin_url

    printed = cli(home, "token", stack.admin_url)
    assert printed.returncode == 0, printed.stderr
    token = printed.stdout.strip()
    assert token == stored["access_token"]
    # Envoy spreads checks over both replicas; each verifies with the key from the store.
    for _ in range(4):
        stack.clear_seen()
        response = through_envoy(stack, token)
        assert response.status_code == 200, response.text
        seen = {k.lower(): v for k, v in stack.seen()[-1]["headers"].items()}
        assert seen["x-sidecar-kind"] == "cli"
        assert seen["x-sidecar-email"] == "alice@example.com"
        assert seen["x-sidecar-groups"] == "ml"
        # The CLI token stayed at the sidecar; the provider got the sidecar's key.
        assert seen["authorization"] == f"Bearer {DEMO_PROVIDER_KEYS['openai']}"
    sdk = openai.OpenAI(base_url=stack.envoy_url + "/openai/v1", api_key=token)
    assert sdk.chat.completions.create(
        model="gpt-4o-mini", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
    ).choices

    other = cli(home, "token", "http://127.0.0.1:1")
    assert other.returncode == 1 and "stored credential is for" in other.stderr
    assert cli(home, "logout").returncode == 0 and not path.exists()
    gone = cli(home, "token")
    assert gone.returncode == 1 and "not logged in" in gone.stderr


async def test_expired_minted_token_is_401(stack: Stack) -> None:
    token = await minted(stack, "late@example.com", ttl=60, age=3600)
    response = through_envoy(stack, token)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "expired"
    fresh = await minted(stack, "late@example.com", ttl=60)
    assert through_envoy(stack, fresh).status_code == 200


async def test_only_a_signed_in_person_may_approve(stack: Stack, issuer: DevIssuer) -> None:
    code = str(new_code(stack.admin_url)["user_code"])
    url = f"{stack.admin_url}/device"
    form = {"user_code": code, "action": "approve", "csrf_token": "x"}
    anonymous = httpx.get(url, params={"user_code": code}, timeout=20)
    assert anonymous.status_code == 401 and "<form" not in anonymous.text
    assert httpx.post(f"{url}/approve", data=form, timeout=20).status_code == 401
    forged = {"cookie": "CF_Authorization=not-a-jwt"}
    assert httpx.get(url, params={"user_code": code}, headers=forged, timeout=20).status_code == 401

    with stack.admin() as admin:
        created = admin.post("/v1/service-tokens", json={"name": "approver-bot"}).json()
    service = {
        "cf-access-client-id": created["result"]["client_id"],
        "cf-access-client-secret": created["result"]["client_secret"],
    }
    cli_token = {"authorization": f"Bearer {await minted(stack, 'alice@example.com', 600)}"}
    access_service = {"cf-access-jwt-assertion": issuer.mint_service("ci-bot.access")}
    for headers in (service, cli_token, access_service):
        page = httpx.get(url, params={"user_code": code}, headers=headers, timeout=20)
        assert page.status_code == 403, (headers.keys(), page.text)
        assert "<form" not in page.text
        assert (
            httpx.post(f"{url}/approve", data=form, headers=headers, timeout=20).status_code == 403
        )

    # A person, but with a CSRF token that is not theirs for this code: refused too.
    carol = person(issuer, "carol@example.com")
    stolen = httpx.post(f"{url}/approve", data=form, headers=carol, timeout=20)
    assert stolen.status_code == 403 and "approved" not in stolen.text.lower()
    page = httpx.get(url, params={"user_code": code}, headers=carol, timeout=20)
    assert page.status_code == 200 and CSRF.search(page.text)
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_token_endpoint_polling_errors_and_single_use(stack: Stack, issuer: DevIssuer) -> None:
    url = stack.admin_url
    started = httpx.post(f"{url}/device/code", json={"client_id": "tests"}, timeout=20).json()
    assert set(started) == {
        "device_code",
        "user_code",
        "verification_uri",
        "verification_uri_complete",
        "expires_in",
        "interval",
    }
    assert USER_CODE.fullmatch(str(started["user_code"]))
    assert started["verification_uri"] == f"{url}/device"
    assert started["interval"] == INTERVAL and started["expires_in"] == 600

    first = poll(url, started["device_code"])
    assert first.status_code == 400 and first.json()["error"] == "authorization_pending"
    assert first.headers["cache-control"] == "no-store"
    assert poll(url, started["device_code"]).json()["error"] == "slow_down"
    # The required interval grew by 5 s: polling at the original pace is still too fast.
    time.sleep(INTERVAL + 0.6)
    assert poll(url, started["device_code"]).json()["error"] == "slow_down"

    alice = person(issuer, "alice@example.com", ["ml"])
    approved = new_code(url)
    decide(replica_url(stack), alice, str(approved["user_code"]))
    issued = poll(url, approved["device_code"])
    assert issued.status_code == 200, issued.text
    body = issued.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    again = poll(replica_url(stack), approved["device_code"])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"

    denied = new_code(url)
    decide(url, alice, str(denied["user_code"]), action="deny")
    assert poll(url, denied["device_code"]).json()["error"] == "access_denied"

    assert poll(url, "no-such-code").json()["error"] == "invalid_grant"
    wrong = httpx.post(
        f"{url}/device/token", timeout=20, data={"grant_type": "password", "device_code": "x"}
    )
    assert wrong.status_code == 400 and wrong.json()["error"] == "unsupported_grant_type"
    missing = httpx.post(f"{url}/device/token", data={"grant_type": GRANT_TYPE}, timeout=20)
    assert missing.json()["error"] == "invalid_request"


def test_jwks_has_public_parts_only(stack: Stack) -> None:
    documents = [
        httpx.get(f"{base}/.well-known/jwks.json", timeout=20).json()
        for base in (stack.admin_url, replica_url(stack))
    ]
    assert documents[0] == documents[1]
    assert documents[0]["keys"]
    for key in documents[0]["keys"]:
        assert set(key) <= {"kty", "crv", "x", "y", "kid", "use", "alg"}
        assert key["kty"] == "EC" and key["alg"] == "ES256" and "d" not in key


def test_wrong_codes_are_rate_limited(stack: Stack, issuer: DevIssuer) -> None:
    # Distinct forwarded addresses (loopback is a trusted proxy here) keep this test's
    # counters apart from the other tests' 127.0.0.1.
    url = f"{stack.admin_url}/device"
    mallory = person(issuer, "mallory@example.com")
    here = {**mallory, "x-forwarded-for": "198.51.100.23"}
    for attempt in range(GUESS_LIMIT):
        if attempt % 2:
            wrong = httpx.get(url, params={"user_code": "BBBB-BBBB"}, headers=here, timeout=20)
        else:
            wrong = httpx.post(
                f"{url}/approve",
                headers=here,
                timeout=20,
                data={"user_code": "BBBB-BBBB", "action": "approve", "csrf_token": "x"},
            )
        assert wrong.status_code == 404, (attempt, wrong.text)
    real = str(new_code(stack.admin_url)["user_code"])
    blocked = httpx.get(url, params={"user_code": real}, headers=here, timeout=20)
    assert blocked.status_code == 429 and '<form method="post"' not in blocked.text
    elsewhere = {**mallory, "x-forwarded-for": "198.51.100.24"}
    assert (
        httpx.get(url, params={"user_code": real}, headers=elsewhere, timeout=20).status_code == 429
    ), "limited per person"
    # One guesser does not lock out the people who share their address.
    neighbour = {**person(issuer, "nina@example.com"), "x-forwarded-for": "198.51.100.23"}
    assert (
        httpx.get(url, params={"user_code": real}, headers=neighbour, timeout=20).status_code == 200
    ), "the address is not blocked by one"
    fresh = {**person(issuer, "nina@example.com"), "x-forwarded-for": "198.51.100.25"}
    assert httpx.get(url, params={"user_code": real}, headers=fresh, timeout=20).status_code == 200
