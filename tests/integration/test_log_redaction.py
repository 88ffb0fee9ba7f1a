"""A run that used JWTs, service tokens, cookies, the admin token and the provider keys the
sidecar injects: no log contains any."""

from __future__ import annotations

import httpx

from devtools.config import DEMO_PROVIDER_KEYS
from devtools.keys import DevIssuer
from devtools.stack import ADMIN_TOKEN, Stack

CHAT = "/openai/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def test_logs_contain_no_credentials(stack: Stack, issuer: DevIssuer) -> None:
    # The demo config holds a key per provider, set on every admitted call above.
    secrets: list[str] = [ADMIN_TOKEN, *DEMO_PROVIDER_KEYS.values()]
    good = issuer.mint("redact@example.com", ["ml"])
    expired = issuer.mint("redact@example.com", ttl=-120)
    secrets += [good, expired]
    for headers in (
        {"authorization": f"Bearer {good}"},
        {"cf-access-jwt-assertion": good},
        {"cookie": f"CF_Authorization={good}; theme=dark"},
        {"authorization": f"Bearer {expired}"},
        {"authorization": "Bearer sk-live-provider-key-should-not-log"},
    ):
        httpx.post(stack.envoy_url + CHAT, json=BODY, headers=headers, timeout=20)
    secrets.append("sk-live-provider-key-should-not-log")
    with stack.admin() as admin:
        token = admin.post("/v1/service-tokens", json={"name": "redaction-bot"}).json()["result"]
        secrets.append(token["client_secret"])
        for secret in (token["client_secret"], "wrong-secret-value-123456"):
            httpx.post(
                stack.envoy_url + CHAT,
                json=BODY,
                timeout=20,
                headers={
                    "cf-access-client-id": token["client_id"],
                    "cf-access-client-secret": secret,
                },
            )
        secrets.append("wrong-secret-value-123456")
        admin.delete(f"/v1/service-tokens/{token['id']}")
    httpx.get(
        stack.admin_url + "/v1/service-tokens",
        timeout=10,
        headers={"authorization": "Bearer not-the-admin-token-but-secret"},
    )
    secrets.append("not-the-admin-token-but-secret")
    logs = {p.name: p.read_text() for p in stack.workdir.glob("*.log")}
    assert any("decision" in text for text in logs.values())
    for name, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"{name} contains a credential"
            # Not even a recognisable part of a JWT's signature.
            if secret.count(".") == 2:
                assert secret.rsplit(".", 1)[1][:20] not in text, name
