"""No credential reaches the provider: every carrier the sidecar understands is taken off
the upstream request, whichever one authenticated, on every transport."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from devtools.config import DEMO_PROVIDER_KEYS, demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack
from sidecar.asgi import SidecarMiddleware
from sidecar.decisions import strip_credentials, strip_list, without_access_cookie
from sidecar.http.app import create_app
from sidecar.services import build_services
from tests.security.policy_stack import CHAT, chat, policy_stack, upstream_headers
from tests.support.nginx import INGRESS_TOKEN, running_nginx

ACCESS_HEADERS = (
    "cf-access-jwt-assertion",
    "cf-access-token",
    "cf-access-client-id",
    "cf-access-client-secret",
)


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    return DevIssuer.generate()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    other = DevIssuer.generate("https://partner.example.com", "partner-aud")
    with pytest.MonkeyPatch.context() as mp:
        # The sidecar hands provider keys only to the ingress (the nginx test below).
        mp.setenv("SIDECAR_INGRESS_TOKEN", INGRESS_TOKEN)
        with policy_stack(tmp_path_factory.mktemp("strip"), issuer, other) as running:
            yield running


def browser_headers(token: str) -> dict[str, str]:
    """What a browser behind Access sends: the assertion header and the Access cookie."""
    return {
        "cf-access-jwt-assertion": token,
        "cookie": f"theme=dark; CF_Authorization={token}; lang=en",
    }


def test_access_cookie_never_reaches_the_provider_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    token = issuer.mint("bea@example.com")
    stack.clear_seen()
    assert chat(stack, browser_headers(token)).status_code == 200
    seen = upstream_headers(stack)
    assert token not in " ".join(seen.values())
    assert seen["cookie"] == "theme=dark; lang=en"
    assert "cf-access-jwt-assertion" not in seen


def test_cookie_header_with_only_the_access_cookie_is_dropped_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    token = issuer.mint("bea@example.com")
    stack.clear_seen()
    headers = {"cf-access-jwt-assertion": token, "cookie": f"CF_Authorization={token}"}
    assert chat(stack, headers).status_code == 200
    assert "cookie" not in upstream_headers(stack)


def test_every_access_header_and_sidecar_bearer_is_stripped_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    token = issuer.mint("cal@example.com")
    headers = {
        "cf-access-jwt-assertion": token,
        "cf-access-token": token,
        "authorization": f"Bearer {token}",
        "cf-access-client-id": "someone.access",
    }
    stack.clear_seen()
    assert chat(stack, headers).status_code == 200
    seen = upstream_headers(stack)
    for name in ACCESS_HEADERS:
        assert name not in seen, name
    # Authorization carries the organisation's key now, never the caller's token.
    assert token not in " ".join(seen.values())
    assert seen["authorization"] == f"Bearer {DEMO_PROVIDER_KEYS['openai']}"
    assert seen["x-sidecar-email"] == "cal@example.com"


def test_a_callers_own_provider_key_is_replaced_by_the_sidecars_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    # Not a sidecar credential, so not stripped as one; but the provider has credentials
    # configured, so the organisation's key takes its place (without credentials it would
    # pass: tests/integration/test_provider_keys.py).
    stack.clear_seen()
    headers = {
        "cf-access-jwt-assertion": issuer.mint("dee@example.com"),
        "authorization": "Bearer sk-provider-key-of-the-caller",
    }
    assert chat(stack, headers).status_code == 200
    seen = upstream_headers(stack)
    assert seen["authorization"] == f"Bearer {DEMO_PROVIDER_KEYS['openai']}"
    assert "cf-access-jwt-assertion" not in seen


def test_service_token_id_and_secret_are_stripped_through_envoy(stack: Stack) -> None:
    with stack.admin() as admin:
        created = admin.post("/v1/service-tokens", json={"name": "strip-agent"})
        assert created.status_code == 201, created.text
        token = created.json()["result"]
    stack.clear_seen()
    headers = {
        "cf-access-client-id": token["client_id"],
        "cf-access-client-secret": token["client_secret"],
    }
    assert chat(stack, headers).status_code == 200
    seen = upstream_headers(stack)
    assert "cf-access-client-id" not in seen and "cf-access-client-secret" not in seen
    assert seen["x-sidecar-token-name"] == "strip-agent"


def test_underscore_header_names_are_rejected_by_envoy(stack: Stack, issuer: DevIssuer) -> None:
    stack.clear_seen()
    headers = {
        "authorization": f"Bearer {issuer.mint('eli@example.com')}",
        "x_sidecar_email": "ceo@example.com",
        "x_sidecar_groups": "platform-admins",
    }
    # Envoy answers 400 or closes the connection; either way nothing goes upstream.
    try:
        status = chat(stack, headers).status_code
    except httpx.HTTPError:
        status = None
    assert status in (400, None)
    assert stack.seen() == []


# The ASGI middleware and /authz, in process: the same rules without Envoy.


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Path:
    workdir = tmp_path_factory.mktemp("strip-inproc")
    jwks = issuer.write_jwks(workdir / "jwks.json")
    path = workdir / "sidecar.yaml"
    path.write_text(yaml.safe_dump(demo_config(issuer, str(jwks), f"sqlite:///{workdir}/s.db")))
    return path


def echo_app() -> tuple[Starlette, list[dict[str, str]]]:
    seen: list[dict[str, str]] = []

    async def echo(request: Request) -> JSONResponse:
        seen.append(dict(request.headers))
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/{path:path}", echo, methods=["POST"])]), seen


def test_asgi_middleware_strips_every_carrier(config_path: Path, issuer: DevIssuer) -> None:
    app, seen = echo_app()
    middleware = SidecarMiddleware(app, config_path=config_path)
    token = issuer.mint("fox@example.com")
    body: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 4, "messages": []}
    try:
        with TestClient(middleware) as client:
            response = client.post(
                CHAT,
                json=body,
                headers={
                    **browser_headers(token),
                    "authorization": f"Bearer {token}",
                    "cf-access-token": token,
                },
            )
            assert response.status_code == 200, response.text
    finally:
        asyncio.run(middleware.close())
    upstream = seen[-1]
    assert token not in " ".join(upstream.values())
    assert upstream["cookie"] == "theme=dark; lang=en"
    assert "cf-access-token" not in upstream
    assert upstream["authorization"] == f"Bearer {DEMO_PROVIDER_KEYS['openai']}"


def test_authz_tells_the_ingress_which_headers_to_remove(
    config_path: Path, issuer: DevIssuer
) -> None:
    token = issuer.mint("gil@example.com")
    services = asyncio.run(build_services(config_path))
    try:
        with TestClient(create_app(services)) as client:
            response = client.post(
                "/authz" + CHAT,
                headers={
                    **browser_headers(token),
                    "authorization": f"Bearer {token}",
                    "x-sidecar-model": "gpt-4o-mini",
                },
            )
    finally:
        asyncio.run(services.close())
    assert response.status_code == 200, response.text
    # Envoy's http_service ext_authz removes what this header lists from the upstream request.
    removed = set(response.headers["x-envoy-auth-headers-to-remove"].split(","))
    assert {"cf-access-jwt-assertion", "authorization"} <= removed
    assert response.headers["cookie"] == "theme=dark; lang=en"


# The removal itself, as every transport uses it.


def test_access_cookie_is_cut_from_joined_and_odd_cookie_headers() -> None:
    assert without_access_cookie("a=1; CF_Authorization=t; b=2") == "a=1; b=2"
    assert without_access_cookie("a=1,CF_Authorization=t; b=2") == "a=1; b=2"
    assert without_access_cookie(" cf_authorization=t ") == ""
    assert without_access_cookie("a=1; b=CF_Authorization") is None  # a value, not the name
    assert without_access_cookie("a=1") is None


def test_a_provider_key_set_by_the_sidecar_is_never_removed() -> None:
    client = {
        "authorization": "Bearer caller-jwt",
        "cookie": "CF_Authorization=t; a=1",
        "cf-access-client-secret": "s",
        "x-sidecar-email": "forged",
    }
    remove, replace = strip_credentials(client, ("authorization",))
    assert remove == {"authorization", "cf-access-client-secret"}
    assert replace == {"cookie": "a=1"}
    injected = {"authorization": "Bearer sk-provider", "x-sidecar-email": "me@example.com"}
    assert strip_list(client, injected, ("authorization",)) == ("cf-access-client-secret",)


def test_caller_jwt_never_reaches_anthropic_through_nginx(
    stack: Stack, issuer: DevIssuer, tmp_path: Path
) -> None:
    token = issuer.mint("hap@example.com")
    sidecar_port = int(stack.admin_url.rsplit(":", 1)[1])
    provider_port = int(stack.provider_url.rsplit(":", 1)[1])
    with running_nginx(tmp_path / "nginx", sidecar_port, provider_port) as url:
        stack.clear_seen()
        response = httpx.post(
            url + "/anthropic/v1/messages",
            timeout=30,
            headers={
                "authorization": f"Bearer {token}",
                "x-sidecar-model": "claude-haiku-4-5",
                "cookie": f"CF_Authorization={token}",
            },
            json={
                "model": "claude-haiku-4-5",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
    assert response.status_code == 200, response.text
    seen = upstream_headers(stack)
    assert token not in " ".join(seen.values())
    assert seen["x-sidecar-email"] == "hap@example.com"
