"""Identity through a real Envoy: who reaches the upstream, with which headers, and who not."""

from __future__ import annotations

import base64
import json
import time

import httpx
import jwt
import openai

from devtools.config import DEMO_PROVIDER_KEYS
from devtools.keys import DevIssuer
from devtools.stack import Stack

CHAT = "/openai/v1/chat/completions"
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hello there"}],
    "max_tokens": 16,
}


def post(
    stack: Stack, headers: dict[str, str], body: dict[str, object] | None = None, path: str = CHAT
) -> httpx.Response:
    return httpx.post(stack.envoy_url + path, json=body or BODY, headers=headers, timeout=20)


def last_seen(stack: Stack) -> dict[str, str]:
    seen = stack.seen()
    assert seen, "the upstream saw no request"
    return {k.lower(): v for k, v in seen[-1]["headers"].items()}


def test_valid_user_reaches_upstream_with_identity_headers(stack: Stack, issuer: DevIssuer) -> None:
    stack.clear_seen()
    token = issuer.mint("alice@example.com", ["ml", {"name": "eng"}])  # type: ignore[list-item]
    response = post(stack, {"cf-access-jwt-assertion": token})
    assert response.status_code == 200, response.text
    headers = last_seen(stack)
    assert headers["x-sidecar-email"] == "alice@example.com"
    assert headers["x-sidecar-groups"] == "ml,eng"
    assert headers["x-sidecar-kind"] == "user"
    assert headers["x-sidecar-model"] == "gpt-4o-mini"
    assert headers["x-sidecar-provider"] == "openai"
    assert "cf-access-jwt-assertion" not in headers


def test_each_credential_location_is_accepted(stack: Stack, issuer: DevIssuer) -> None:
    token = issuer.mint("bob@example.com")
    for headers in (
        {"cf-access-jwt-assertion": token},
        {"cf-access-token": token},
        {"authorization": f"Bearer {token}"},
        {"cookie": f"other=1; CF_Authorization={token}"},
    ):
        stack.clear_seen()
        response = post(stack, headers)
        assert response.status_code == 200, (headers.keys(), response.text)
        assert last_seen(stack)["x-sidecar-email"] == "bob@example.com"


def test_directory_groups_are_merged(stack: Stack, issuer: DevIssuer) -> None:
    stack.clear_seen()
    response = post(stack, {"authorization": f"Bearer {issuer.mint('dana@example.com', ['x'])}"})
    assert response.status_code == 200
    assert last_seen(stack)["x-sidecar-groups"] == "x,ml"


def test_spoofed_sidecar_headers_are_replaced(stack: Stack, issuer: DevIssuer) -> None:
    stack.clear_seen()
    headers = {
        "authorization": f"Bearer {issuer.mint('carol@example.com', ['eng'])}",
        "x-sidecar-email": "ceo@example.com",
        "x-sidecar-groups": "platform-admins",
        "x-sidecar-kind": "service",
        "x-sidecar-token-name": "forged",
        "x-sidecar-anything": "forged",
        "x-sidecar-route": "fallback",
        "cf-access-client-secret": "leak-me-not",
    }
    response = post(stack, headers)
    assert response.status_code == 200, response.text
    seen = last_seen(stack)
    assert seen["x-sidecar-email"] == "carol@example.com"
    assert seen["x-sidecar-groups"] == "eng"
    assert seen["x-sidecar-kind"] == "user"
    for gone in (
        "x-sidecar-token-name",
        "x-sidecar-anything",
        "x-sidecar-route",
        "cf-access-client-secret",
    ):
        assert gone not in seen, gone
    # The caller's JWT in Authorization is replaced by the provider key the sidecar holds.
    assert seen["authorization"] == f"Bearer {DEMO_PROVIDER_KEYS['openai']}"
    # The forged route header did not pick the fallback route either.
    assert stack.seen()[-1]["path"] == "/v1/chat/completions"


def test_no_credentials_is_401_with_json_and_challenge(stack: Stack) -> None:
    response = post(stack, {})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == "missing_credentials"


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def bad_tokens(issuer: DevIssuer) -> dict[str, tuple[str, str]]:
    other = DevIssuer.generate(issuer.issuer, issuer.audience)
    other.kid = issuer.kid  # same kid, different key: the signature must fail
    now = int(time.time())
    good = issuer.claims("eve@example.com")
    public_pem = issuer.key.public_key().public_bytes(
        encoding=__import__(
            "cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]
        ).Encoding.PEM,
        format=__import__(
            "cryptography.hazmat.primitives.serialization", fromlist=["PublicFormat"]
        ).PublicFormat.SubjectPublicKeyInfo,
    )
    header, _payload, signature = issuer.mint("eve@example.com").split(".")
    tampered_payload = _b64({**good, "email": "admin@example.com"})
    hs_header = _b64({"alg": "HS256", "typ": "JWT", "kid": issuer.kid})
    hs_body = _b64(good)
    import hashlib
    import hmac

    hs_sig = (
        base64.urlsafe_b64encode(
            hmac.new(public_pem, f"{hs_header}.{hs_body}".encode(), hashlib.sha256).digest()
        )
        .rstrip(b"=")
        .decode()
    )
    return {
        "expired": (
            issuer.sign({**good, "exp": now - 3600, "iat": now - 7200, "nbf": now - 7200}),
            "expired",
        ),
        "wrong_audience": (issuer.sign({**good, "aud": ["someone-else"]}), "wrong_audience"),
        "wrong_issuer": (
            issuer.sign({**good, "iss": "https://evil.example.com"}),
            "unknown_issuer",
        ),
        "alg_none": (f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(good)}.", "bad_algorithm"),
        "hs256_with_public_key": (f"{hs_header}.{hs_body}.{hs_sig}", "bad_algorithm"),
        "another_key": (other.sign(good), "bad_signature"),
        "unknown_kid": (issuer.sign(good, {"kid": "not-a-known-kid"}), "unknown_kid"),
        "nbf_future": (issuer.sign({**good, "nbf": now + 3600}), "not_yet_valid"),
        "tampered": (f"{header}.{tampered_payload}.{signature}", "bad_signature"),
        "garbage": ("this-is-not-a-jwt", "malformed"),
        "huge": ("e" * 40_000, "malformed"),
    }


def test_bad_tokens_are_401_each_with_reason(stack: Stack, issuer: DevIssuer) -> None:
    for name, (token, reason) in bad_tokens(issuer).items():
        response = post(stack, {"cf-access-jwt-assertion": token})
        assert response.status_code == 401, (name, response.status_code, response.text)
        assert response.json()["error"]["code"] == reason, name
        assert "invalid_token" in response.headers["www-authenticate"], name


def test_access_service_token_jwt_maps_common_name(stack: Stack, issuer: DevIssuer) -> None:
    stack.clear_seen()
    response = post(stack, {"cf-access-jwt-assertion": issuer.mint_service("ci-bot.access")})
    assert response.status_code == 200, response.text
    seen = last_seen(stack)
    assert seen["x-sidecar-kind"] == "service"
    assert seen["x-sidecar-token-name"] == "ci-bot.access"
    assert "x-sidecar-email" not in seen


def test_service_token_create_use_revoke(stack: Stack) -> None:
    with stack.admin() as admin:
        created = admin.post(
            "/v1/service-tokens", json={"name": "nightly-agent", "groups": ["agents"]}
        )
        assert created.status_code == 201, created.text
        token = created.json()["result"]
        listed = admin.get("/v1/service-tokens").json()["result"]
        assert any(t["id"] == token["id"] for t in listed)
        assert all("secret_hash" not in t and "client_secret" not in t for t in listed)
        headers = {
            "cf-access-client-id": token["client_id"],
            "cf-access-client-secret": token["client_secret"],
        }
        stack.clear_seen()
        assert post(stack, headers).status_code == 200
        seen = last_seen(stack)
        assert seen["x-sidecar-kind"] == "service"
        assert seen["x-sidecar-token-name"] == "nightly-agent"
        assert seen["x-sidecar-groups"] == "agents"
        assert "cf-access-client-secret" not in seen
        wrong = {**headers, "cf-access-client-secret": token["client_secret"][:-1] + "x"}
        assert post(stack, wrong).status_code == 401
        assert admin.delete(f"/v1/service-tokens/{token['id']}").status_code == 200
        revoked_at = time.monotonic()
        while post(stack, headers).status_code != 401:
            assert time.monotonic() - revoked_at < 1.0, "revocation took over a second"
            time.sleep(0.05)
        assert post(stack, headers).json()["error"]["code"] == "revoked"


def test_intern_outside_allowlist_is_403(stack: Stack, issuer: DevIssuer) -> None:
    token = issuer.mint("ivan@example.com", ["interns"])
    response = post(stack, {"authorization": f"Bearer {token}"}, {**BODY, "model": "gpt-4o"})
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "model_not_allowed"
    assert post(stack, {"authorization": f"Bearer {token}"}).status_code == 200


def test_malformed_body_is_400(stack: Stack, issuer: DevIssuer) -> None:
    auth = {
        "authorization": f"Bearer {issuer.mint('alice@example.com')}",
        "content-type": "application/json",
    }
    for content in (b"{not json", b"[1,2]", b'{"messages": []}', b'{"model": 5}'):
        response = httpx.post(stack.envoy_url + CHAT, content=content, headers=auth, timeout=10)
        assert response.status_code == 400, content
        assert response.json()["error"]["type"] == "bad_request"


def test_openai_sdk_end_to_end(stack: Stack, issuer: DevIssuer) -> None:
    client = openai.OpenAI(
        base_url=stack.envoy_url + "/openai/v1", api_key=issuer.mint("alice@example.com", ["ml"])
    )
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8
    )
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    with __import__("pytest").raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=stack.envoy_url + "/openai/v1", api_key="sk-not-a-jwt", max_retries=0
        ).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])


def test_unused_jwt_module_guard() -> None:
    # pyjwt must refuse alg=none outright even when asked to verify with no key.
    assert jwt.get_unverified_header(f"{_b64({'alg': 'none'})}.{_b64({})}.")["alg"] == "none"
