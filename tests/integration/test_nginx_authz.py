"""deploy/nginx/nginx.conf with a real nginx: auth_request to a running sidecar's /authz,
in front of the fake provider. Allowed calls reach the upstream with the identity headers;
401, 403, 400 and 429 reach the client with their real status and JSON body."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack
from tests.support.nginx import (
    ANTHROPIC_KEY,
    INGRESS_TOKEN,
    OPENAI_KEY,
    config_test_argv,
    render,
    running_nginx,
)

CHAT = "/openai/v1/chat/completions"
# $0.01 per output token and one output token per call, estimated from
# default_max_output_tokens (nginx sends no body): every call reserves exactly $0.01.
FLAT = {"provider": "openai", "model": "flat-cent", "input_per_mtok": 0, "output_per_mtok": 10000}
LIMITS = [
    {
        "name": "three-cents",
        "budget_usd": 0.03,
        "window": {"fixed": "daily"},
        "filter": {"model": ["flat-*"]},
        "split": ["user"],
        "action": "block",
    }
]


@pytest.fixture(scope="module")
def nginx_stack(
    tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer
) -> Iterator[tuple[Stack, str]]:
    workdir = tmp_path_factory.mktemp("nginx")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    config = demo_config(
        issuer,
        jwks,
        f"sqlite:///{workdir}/s.db",
        spend_limits=LIMITS,
        pricing={"unknown_model": "reject", "overrides": [FLAT]},
        admission={"default_max_output_tokens": 1},
    )
    with pytest.MonkeyPatch.context() as mp:
        # The sidecar gives provider keys only to an ingress presenting this token.
        mp.setenv("SIDECAR_INGRESS_TOKEN", INGRESS_TOKEN)
        with running_stack(workdir, issuer, config) as stack:
            sidecar_port = int(stack.admin_url.rsplit(":", 1)[1])
            provider_port = int(stack.provider_url.rsplit(":", 1)[1])
            with running_nginx(workdir / "nginx", sidecar_port, provider_port) as url:
                yield stack, url


def call(
    url: str, token: str | None, model: str | None = "flat-cent", **headers: str
) -> httpx.Response:
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    if model is not None:
        sent["x-sidecar-model"] = model
    return httpx.post(
        url + CHAT,
        headers=sent,
        timeout=30,
        json={
            "model": model or "flat-cent",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["success"] is False
    return dict(body["error"])


def test_shipped_config_passes_nginx_t(tmp_path: Path) -> None:
    conf = render(tmp_path, 18080, 9002, 9003)
    result = subprocess.run(
        config_test_argv(tmp_path, conf), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_allowed_call_carries_identity_upstream(
    nginx_stack: tuple[Stack, str], issuer: DevIssuer
) -> None:
    stack, url = nginx_stack
    stack.clear_seen()
    token = issuer.mint("nina@example.com", ["ml", "eng"])
    response = call(
        url, token, x_sidecar_email="forged@example.com", cf_access_client_secret="leak-me"
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "flat-cent"
    assert response.headers["x-sidecar-budget-remaining"] == "0.020000"
    request_id = response.headers["x-request-id"]
    seen = stack.seen()[-1]
    headers = seen["headers"]
    assert seen["path"] == "/v1/chat/completions"
    assert headers["x-sidecar-email"] == "nina@example.com"
    assert headers["x-sidecar-groups"] == "ml,eng"
    assert headers["x-sidecar-kind"] == "user"
    assert headers["x-sidecar-model"] == "flat-cent"
    assert headers["x-sidecar-provider"] == "openai"
    assert headers["x-request-id"] == request_id
    # The caller's JWT and secrets stay at nginx; the provider sees the configured key.
    assert headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "cf-access-client-secret" not in headers
    assert "x-sidecar-token-name" not in headers
    assert seen["body"]["model"] == "flat-cent"


def test_anthropic_call_gets_the_sidecars_key_and_a_version(
    nginx_stack: tuple[Stack, str], issuer: DevIssuer
) -> None:
    stack, url = nginx_stack
    token = issuer.mint("nils@example.com", ["ml"])
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "hi"}],
    }
    for sent_version, arrived_version in ((None, "2023-06-01"), ("2024-10-22", "2024-10-22")):
        headers = {
            "authorization": f"Bearer {token}",
            "x-sidecar-model": "claude-haiku-4-5",
            "x-api-key": "sk-ant-caller-own",
        }
        if sent_version:
            headers["anthropic-version"] = sent_version
        stack.clear_seen()
        response = httpx.post(
            url + "/anthropic/v1/messages", headers=headers, json=body, timeout=30
        )
        assert response.status_code == 200, response.text
        arrived = stack.seen()[-1]["headers"]
        assert arrived["x-api-key"] == ANTHROPIC_KEY
        assert arrived["anthropic-version"] == arrived_version
        assert "authorization" not in arrived
        assert ANTHROPIC_KEY not in response.text + str(dict(response.headers))


def test_401_without_and_with_a_bad_credential(
    nginx_stack: tuple[Stack, str], issuer: DevIssuer
) -> None:
    stack, url = nginx_stack
    stack.clear_seen()
    missing = call(url, None)
    assert error_of(missing, 401)["code"] == "missing_credentials"
    # Exactly once: nginx copies it from the subrequest, nothing adds a second one.
    assert missing.headers.get_list("www-authenticate") == ['Bearer realm="llm-sidecar"']
    expired = call(url, issuer.mint("old@example.com", ttl=-120))
    assert error_of(expired, 401)["code"] == "expired"
    assert stack.seen() == []


def test_403_model_not_allowed(nginx_stack: tuple[Stack, str], issuer: DevIssuer) -> None:
    stack, url = nginx_stack
    stack.clear_seen()
    response = call(url, issuer.mint("ivan@example.com", ["interns"]), model="gpt-4o")
    assert error_of(response, 403)["type"] == "model_not_allowed"
    assert stack.seen() == []


def test_400_without_model_header(nginx_stack: tuple[Stack, str], issuer: DevIssuer) -> None:
    _, url = nginx_stack
    response = call(url, issuer.mint("olga@example.com"), model=None)
    error = error_of(response, 400)
    assert error["type"] == "bad_request" and "x-sidecar-model" in error["message"]


def test_429_after_exactly_three_calls(nginx_stack: tuple[Stack, str], issuer: DevIssuer) -> None:
    stack, url = nginx_stack
    token = issuer.mint("pavel@example.com")
    statuses = [call(url, token).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    stack.clear_seen()
    denied = call(url, token)
    error = error_of(denied, 429)
    assert error["type"] == "spend_limit_exceeded"
    assert error["rule"] == "three-cents"
    assert error["bucket"] == "user=pavel@example.com"
    assert error["limit"] == 0.03
    assert 0 < int(denied.headers["retry-after"]) <= 86_400
    assert stack.seen() == []
    # Internal headers used to carry the answer through nginx do not leak to the client.
    assert "x-sidecar-error" not in denied.headers
    assert "x-sidecar-status" not in denied.headers


def test_authz_location_is_not_reachable_from_outside(nginx_stack: tuple[Stack, str]) -> None:
    _, url = nginx_stack
    assert httpx.get(url + "/_sidecar_authz", timeout=10).status_code == 404
