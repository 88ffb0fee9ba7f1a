"""`/authz` in each ingress's dialect (Envoy http_service, nginx, Traefik), on a real engine
and SQLite store; and the recent-refusals ring the dashboard reads."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from starlette.testclient import TestClient

from devtools.config import demo_config
from devtools.keys import DevIssuer
from sidecar.budget.recent import RecentDecisions, entry, recent
from sidecar.decisions import allow, deny
from sidecar.http.app import create_app
from sidecar.http.authz import BadOriginal, original_request
from sidecar.model import Identity, RequestAttrs
from sidecar.services import build_services
from sidecar.store.sqlite_store import SQLiteStore

FLAT = {"provider": "openai", "model": "flat-cent", "input_per_mtok": 0, "output_per_mtok": 10000}
LIMITS = [
    {
        "name": "two-cents",
        "budget_usd": 0.02,
        "window": {"fixed": "daily"},
        "split": ["user"],
        "action": "block",
    }
]
CHAT = "/openai/v1/chat/completions"


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    return DevIssuer.generate()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[TestClient]:
    workdir = tmp_path_factory.mktemp("authz")
    jwks = issuer.write_jwks(workdir / "jwks.json")
    path = workdir / "sidecar.yaml"
    path.write_text(
        yaml.safe_dump(
            demo_config(
                issuer,
                str(jwks),
                f"sqlite:///{workdir}/s.db",
                spend_limits=LIMITS,
                pricing={"unknown_model": "reject", "overrides": [FLAT]},
                admission={"default_max_output_tokens": 1},
            )
        )
    )
    services = asyncio.run(build_services(path))
    with TestClient(create_app(services)) as test_client:
        yield test_client
    asyncio.run(services.close())


def bearer(issuer: DevIssuer, email: str, groups: list[str] | None = None) -> dict[str, str]:
    return {"authorization": f"Bearer {issuer.mint(email, groups)}"}


def test_envoy_path_prefix_mode(client: TestClient, issuer: DevIssuer) -> None:
    response = client.post(
        "/authz" + CHAT,
        headers={
            **bearer(issuer, "ann@example.com", ["ml"]),
            "x-sidecar-model": "flat-cent",
            "x-request-id": "envoy-req-1",
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-sidecar-email"] == "ann@example.com"
    assert response.headers["x-sidecar-groups"] == "ml"
    assert response.headers["x-sidecar-provider"] == "openai"
    assert response.headers["x-sidecar-budget-remaining"] == "0.010000"
    # The sidecar's own reservation id, never the caller's x-request-id.
    minted = response.headers["x-sidecar-request-id"]
    assert minted != "envoy-req-1" and re.fullmatch(r"[0-9a-f]{32}", minted)
    assert "x-sidecar-status" not in response.headers
    # Not an LLM call (no model, a GET): identity only.
    listing = client.get("/authz/openai/v1/models", headers=bearer(issuer, "ann@example.com"))
    assert listing.status_code == 200 and "x-sidecar-model" not in listing.headers


def test_traefik_mode_keeps_real_statuses(client: TestClient, issuer: DevIssuer) -> None:
    headers = {
        **bearer(issuer, "tom@example.com"),
        "x-sidecar-model": "flat-cent",
        "x-forwarded-method": "POST",
        "x-forwarded-uri": CHAT,
        "x-forwarded-host": "llm.example.com",
    }
    assert [client.get("/authz", headers=headers).status_code for _ in range(2)] == [200, 200]
    denied = client.get("/authz", headers=headers)
    assert denied.status_code == 429
    assert denied.json()["error"]["rule"] == "two-cents"
    assert int(denied.headers["retry-after"]) > 0
    assert "x-sidecar-error" not in denied.headers
    missing = client.get(
        "/authz", headers={k: v for k, v in headers.items() if k != "authorization"}
    )
    assert missing.status_code == 401 and missing.headers["www-authenticate"]


def test_nginx_mode_maps_statuses_into_headers(client: TestClient, issuer: DevIssuer) -> None:
    headers = {
        **bearer(issuer, "nat@example.com"),
        "x-sidecar-model": "flat-cent",
        "x-original-method": "POST",
        "x-original-uri": CHAT,
    }
    for _ in range(2):
        assert client.get("/authz", headers=headers).status_code == 200
    denied = client.get("/authz", headers=headers)
    assert denied.status_code == 403
    assert denied.headers["x-sidecar-status"] == "429"
    assert json.loads(denied.headers["x-sidecar-error"]) == denied.json()
    assert denied.json()["error"]["type"] == "spend_limit_exceeded"
    unauth = client.get("/authz", headers={"x-original-method": "GET", "x-original-uri": "/x"})
    assert unauth.status_code == 401 and unauth.headers["x-sidecar-status"] == "401"


def test_bad_descriptions_are_400(client: TestClient, issuer: DevIssuer) -> None:
    auth = bearer(issuer, "bea@example.com")
    cases = [
        {},  # no description of the original request at all
        {"x-forwarded-uri": CHAT},  # no method
        {"x-forwarded-uri": "no-slash", "x-forwarded-method": "POST"},
        {"x-forwarded-uri": CHAT, "x-forwarded-method": "POST"},  # no model, LLM path
        {"x-forwarded-uri": CHAT, "x-forwarded-method": "POST", "x-sidecar-model": "m" * 300},
    ]
    for extra in cases:
        response = client.get("/authz", headers={**auth, **extra})
        assert response.status_code == 400, extra
        assert response.json()["error"]["type"] == "bad_request"
    nginx = client.get(
        "/authz", headers={**auth, "x-original-uri": CHAT, "x-original-method": "POST"}
    )
    assert nginx.status_code == 403 and nginx.headers["x-sidecar-status"] == "400"
    assert "x-sidecar-model" in nginx.json()["error"]["message"]
    # Seen as nginx (X-Original-URI), a disagreeing X-Forwarded-Uri is a 400 in disguise.
    spoofed = client.get(
        "/authz",
        headers={
            **auth,
            "x-original-uri": CHAT,
            "x-original-method": "POST",
            "x-forwarded-uri": "/other",
        },
    )
    assert spoofed.status_code == 403 and spoofed.headers["x-sidecar-status"] == "400"


def test_original_request_parsing() -> None:
    assert original_request("openai/v1/x", "PUT", {}) == ("PUT", "/openai/v1/x", False)
    assert original_request(
        None, "GET", {"x-original-uri": "/a?b=1", "x-original-method": "post"}
    ) == ("POST", "/a?b=1", True)
    with pytest.raises(BadOriginal):
        original_request(None, "GET", {"x-original-uri": "/a", "x-original-method": "P OST"})


async def test_recent_ring_is_bounded_and_newest_first(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "r.db"))
    await store.open()
    clock = iter(range(100, 200))
    ring = RecentDecisions(store, size=3, clock=lambda: float(next(clock)))
    who = Identity(kind="user", subject="s", email="zoe@example.com")
    attrs = RequestAttrs("POST", CHAT, {}, request_id="r")
    full = deny(
        "spend_limit_exceeded",
        "full",
        identity=who,
        model="gpt-4o",
        rule="r1",
        bucket="user=zoe@example.com",
        spent=1.0,
    )
    fallback = allow(who, {}, model="cheap", provider="openai", fallback_from="gpt-4o")
    assert entry(attrs, allow(who, {}), 1.0) is None
    for _ in range(4):
        ring.observe(attrs, full)
    ring.observe(attrs, fallback)
    await ring.drain()
    listed = await recent(store, now=200.0)
    assert len(listed) == 3
    assert listed[0]["reason"] == "fallback" and listed[0]["fallback_to"] == "cheap"
    assert listed[0]["model"] == "gpt-4o"
    assert listed[1]["rule"] == "r1" and listed[1]["user"] == "zoe@example.com"
    assert [e["at"] for e in listed] == sorted((e["at"] for e in listed), reverse=True)
    await store.close()
