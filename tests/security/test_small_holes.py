"""Smaller holes: provider calls that are not POSTs, JSON nested past the parser's depth,
e-mail spellings and foreign issuers in directory grants, keys in the access log, and the
order of /authz's answers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack
from sidecar.config.loader import ConfigError, parse_config
from sidecar.http.app import create_app
from sidecar.http.device import BadParams, read_params
from sidecar.identity.directory import Directory
from sidecar.identity.jwt_verify import IssuerPolicy, JwtVerifier
from sidecar.metering import load_json
from sidecar.policy.request import model_in_path
from sidecar.services import build_services
from tests.security.policy_stack import CHAT, LLAMA, chat, policy_stack, upstream_headers
from tests.support.ledger import charged

DEPTH = 100_000


def deep(depth: int = DEPTH) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    return DevIssuer.generate()


@pytest.fixture(scope="module")
def other() -> DevIssuer:
    return DevIssuer.generate("https://partner.example.com", "partner-aud")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer, other: DevIssuer
) -> Iterator[Stack]:
    with policy_stack(tmp_path_factory.mktemp("holes"), issuer, other) as running:
        yield running


def bearer(issuer: DevIssuer, email: str, groups: list[str] | None = None) -> dict[str, str]:
    return {"authorization": f"Bearer {issuer.mint(email, groups)}"}


# a. Non-POST provider calls.


def test_put_naming_a_denied_model_is_decided_like_a_post_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    stack.clear_seen()
    body = {"model": "gpt-4o", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}
    for method in ("PUT", "PATCH"):
        response = httpx.request(
            method,
            stack.envoy_url + CHAT,
            json=body,
            timeout=20,
            headers=bearer(issuer, "ivy@example.com", ["contractors"]),
        )
        assert response.status_code == 403, (method, response.text)
        assert response.json()["error"]["type"] == "model_not_allowed"
    assert stack.seen() == []


def test_model_in_the_path_is_decided_whatever_the_method_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    stack.clear_seen()
    headers = bearer(issuer, "ivy@example.com", ["contractors"])
    for method in ("GET", "POST"):
        response = httpx.request(
            method,
            f"{stack.envoy_url}/workers-ai/run/{LLAMA}",
            json={"prompt": "hi"} if method == "POST" else None,
            headers=headers,
            timeout=20,
        )
        assert response.status_code == 403, (method, response.text)
    assert stack.seen() == []
    # Someone allowed the model gets a decision with the model from the path.
    allowed = httpx.post(
        f"{stack.envoy_url}/workers-ai/run/{LLAMA}",
        json={"prompt": "hi"},
        headers=bearer(issuer, "jon@example.com"),
        timeout=20,
    )
    assert allowed.status_code != 400, allowed.text
    assert upstream_headers(stack)["x-sidecar-model"] == LLAMA


def test_listing_models_stays_identity_only_through_envoy(stack: Stack, issuer: DevIssuer) -> None:
    stack.clear_seen()
    httpx.get(
        stack.envoy_url + "/openai/v1/models",
        timeout=20,
        headers=bearer(issuer, "ivy@example.com", ["contractors"]),
    )
    seen = upstream_headers(stack)
    assert seen["x-sidecar-email"] == "ivy@example.com" and "x-sidecar-model" not in seen


# b. Deeply nested JSON.


def test_deep_json_body_is_400_through_envoy(stack: Stack, issuer: DevIssuer) -> None:
    body = '{"model": "gpt-4o-mini", "messages": ' + deep() + "}"
    response = httpx.post(
        stack.envoy_url + CHAT,
        content=body,
        timeout=20,
        headers={**bearer(issuer, "kit@example.com"), "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "bad_request"


def test_deep_metadata_header_is_400_through_envoy(stack: Stack, issuer: DevIssuer) -> None:
    headers = {**bearer(issuer, "kit@example.com"), "cf-aig-metadata": deep(1000)}
    response = httpx.post(
        stack.envoy_url + CHAT,
        timeout=20,
        headers=headers,
        json={"model": "gpt-4o-mini", "messages": []},
    )
    assert response.status_code == 400, response.text


def test_deep_json_admin_body_is_400(stack: Stack) -> None:
    with stack.admin() as admin:
        for path in ("/v1/spend-limits", "/v1/service-tokens"):
            response = admin.post(
                path, content=deep(20_000), headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, (path, response.text)
            assert response.json()["success"] is False


def test_deep_json_device_params_and_metering_are_refused() -> None:
    async def endpoint(request: Request) -> Response:
        try:
            return JSONResponse(await read_params(request))
        except BadParams as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    app = Starlette(routes=[Route("/", endpoint, methods=["POST"])])
    with TestClient(app) as client:
        response = client.post(
            "/", content=deep(20_000), headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert load_json(deep()) is None


# c. E-mail spellings and directory grants.


def test_email_spellings_share_one_user_bucket_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    for email in ("lea@example.com", "Lea@Example.COM", " LEA@example.com "):
        response = chat(stack, bearer(issuer, email), case="user")
        assert response.status_code == 429, (email, response.text)
        assert response.json()["error"]["bucket"] == "user=lea@example.com", email


def test_ledger_user_is_the_normalised_email(stack: Stack, issuer: DevIssuer) -> None:
    for email in ("Max@Example.com", "max@example.com "):
        assert chat(stack, bearer(issuer, email)).status_code == 200
    # Envoy meters after the answer: wait until both charges are booked, under one user.
    charged(stack, "max@example.com", requests=2)
    with stack.admin() as admin:
        rows = admin.get("/v1/usage", params={"group_by": "user"}).json()["result"]
    users = {r["user"] for r in rows if "max@" in r["user"].lower()}
    assert users == {"max@example.com"}


def test_directory_grant_follows_email_spelling_but_not_another_issuer_through_envoy(
    stack: Stack, issuer: DevIssuer, other: DevIssuer
) -> None:
    stack.clear_seen()
    assert chat(stack, bearer(issuer, " Dana@Example.com")).status_code == 200
    assert upstream_headers(stack).get("x-sidecar-groups") == "ml"
    # A second trusted issuer asserting the same address is not granted the group.
    assert chat(stack, bearer(other, "dana@example.com")).status_code == 200
    assert upstream_headers(stack).get("x-sidecar-groups", "") == ""


def test_directory_grant_never_applies_to_a_service_jwt(issuer: DevIssuer) -> None:
    verifier = JwtVerifier(
        [
            IssuerPolicy(
                issuer.issuer, (issuer.audience,), ("RS256",), "groups", 30, StaticKey(issuer)
            )
        ],
        {"dana@example.com": ("ml",)},
    )
    claims = issuer.claims("dana@example.com", None, common_name="agent.access")
    claims["sub"] = ""
    identity = asyncio.run(verifier.verify(issuer.sign(claims)))
    assert identity.kind == "service" and identity.groups == ()


def test_directory_grant_never_applies_to_a_device_login_token(issuer: DevIssuer) -> None:
    # Device-login tokens carry the approver's groups as approved; the directory is not
    # consulted again for them.
    verifier = JwtVerifier(
        [
            IssuerPolicy(
                issuer.issuer,
                (issuer.audience,),
                ("RS256",),
                "groups",
                30,
                StaticKey(issuer),
                own=True,
            )
        ],
        Directory.build([("ml", issuer.issuer, "dana@example.com")]),
    )
    token = issuer.sign(issuer.claims("dana@example.com", ["eng"], kind="cli"))
    identity = asyncio.run(verifier.verify(token))
    assert identity.kind == "cli" and identity.groups == ("eng",)


class StaticKey:
    def __init__(self, issuer: DevIssuer) -> None:
        self.key = issuer.key.public_key()

    async def key_for(self, kid: str) -> Any:
        return self.key


def test_plain_directory_entry_is_refused_with_several_issuers(
    issuer: DevIssuer, other: DevIssuer, tmp_path: Path
) -> None:
    config = demo_config(issuer, str(tmp_path / "jwks.json"), "sqlite:///x.db")
    config["identity"]["jwt"]["issuers"].append(
        {"issuer": other.issuer, "audiences": [other.audience], "jwks_file": "other.json"}
    )
    with pytest.raises(ConfigError, match=r"identity\.directory\.groups\.ml\[0\].*issuer"):
        parse_config(config)


# d. Access log.


def test_access_log_has_no_query_string_through_envoy(stack: Stack, issuer: DevIssuer) -> None:
    secret = "sk-secret-in-query-0123456789"
    response = httpx.post(
        f"{stack.envoy_url}{CHAT}?key={secret}",
        timeout=20,
        headers=bearer(issuer, "ned@example.com"),
        json={"model": "gpt-4o-mini", "max_tokens": 4, "messages": []},
    )
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    log = Path(stack.workdir) / f"envoy-{stack.envoy_url.rsplit(':', 1)[1]}.log"
    deadline = time.monotonic() + 10
    line = None
    while line is None and time.monotonic() < deadline:
        line = next((x for x in log.read_text().splitlines() if request_id in x), None)
        if line is None:
            time.sleep(0.05)  # Envoy flushes its access log on its own timer
    assert line is not None, "no access log line for the request"
    assert secret not in log.read_text()
    assert json.loads(line)["path"] == CHAT


# e. /authz answers identity first.


def test_authz_unauthenticated_without_model_is_401(tmp_path: Path, issuer: DevIssuer) -> None:
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(demo_config(issuer, str(jwks), f"sqlite:///{tmp_path}/s.db")))
    services = asyncio.run(build_services(path))
    try:
        with TestClient(create_app(services)) as client:
            envoy_style = client.post("/authz" + CHAT)
            nginx_style = client.post(
                "/authz", headers={"x-original-uri": CHAT, "x-original-method": "POST"}
            )
            no_original = client.get("/authz")
    finally:
        asyncio.run(services.close())
    assert envoy_style.status_code == 401, envoy_style.text
    assert envoy_style.json()["error"]["code"] == "missing_credentials"
    assert nginx_style.status_code == 401, nginx_style.text
    assert no_original.status_code == 401, no_original.text


def test_model_named_by_the_path_is_read_percent_decoded() -> None:
    assert model_in_path(f"run/{LLAMA}") == LLAMA
    assert model_in_path("client/v4/accounts/x/ai/run/%40cf/meta/llama-3?x=1") == "@cf/meta/llama-3"
    assert model_in_path("v1beta/models/gemini-2.5-pro:generateContent") == "gemini-2.5-pro"
    assert model_in_path("v1/models") is None
    assert model_in_path("v1/chat/completions") is None


def test_path_and_body_naming_different_models_is_400_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    stack.clear_seen()
    headers = bearer(issuer, "ola@example.com")
    mismatch = httpx.post(
        f"{stack.envoy_url}/workers-ai/run/{LLAMA}",
        headers=headers,
        json={"model": "gpt-4o", "prompt": "hi"},
        timeout=20,
    )
    assert mismatch.status_code == 400, mismatch.text
    dotted = httpx.post(
        f"{stack.envoy_url}/workers-ai/run/%40cf%2F..%2F..%2Fv1%2Fchat",
        headers=headers,
        json={"prompt": "hi"},
        timeout=20,
    )
    assert dotted.status_code == 400, dotted.text
    assert dotted.json()["error"]["type"] == "bad_request"
    assert stack.seen() == []


def test_authz_model_header_must_agree_with_the_path(tmp_path: Path, issuer: DevIssuer) -> None:
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(demo_config(issuer, str(jwks), f"sqlite:///{tmp_path}/s.db")))
    services = asyncio.run(build_services(path))
    try:
        with TestClient(create_app(services)) as client:
            response = client.post(
                f"/authz/workers-ai/run/{LLAMA}",
                headers={
                    **bearer(issuer, "ivy@example.com", ["interns"]),
                    "x-sidecar-model": "gpt-4o-mini",
                },
            )
    finally:
        asyncio.run(services.close())
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "bad_request"
