"""Provider keys through a real Envoy with the official SDKs: the sidecar's key reaches the
provider, the caller's credential does not, errors cost $0, and the key shows up nowhere.

The fake provider only accepts the keys this module configures (anything else gets the
provider's own 401), and it records every request's headers, so each call proves which key
arrived. Tests run in file order on one stack; the last one reads every log.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import uuid
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import httpx
import openai
import pytest
import yaml

from devtools.config import DEMO_PROVIDER_KEYS, demo_config
from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack
from sidecar import cli
from tests.support.ledger import eventually
from tests.support.prices import genai_micros

T = TypeVar("T")
OPENAI_KEY = f"sk-org-openai-{secrets.token_hex(12)}"
RESEARCH_KEY = f"sk-org-research-{secrets.token_hex(12)}"
ROTATED_KEY = f"sk-org-rotated-{secrets.token_hex(12)}"
ANTHROPIC_KEY = DEMO_PROVIDER_KEYS["anthropic"]
CLIENT_KEY = f"sk-client-own-{secrets.token_hex(8)}"
INGRESS_TOKEN = f"ingress-{secrets.token_hex(8)}"
WORKERS_MODEL = "@cf/meta/llama-3.1-8b-instruct"
CHAT = "/v1/chat/completions"
MESSAGES: Any = [{"role": "user", "content": "Which key did you get?"}]


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    secrets_dir = tmp_path_factory.mktemp("secrets")
    (secrets_dir / "openai").write_text(OPENAI_KEY + "\n")
    (secrets_dir / "openai-research").write_text(RESEARCH_KEY)
    return secrets_dir


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer, keys_dir: Path
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("keys")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    providers = [
        {
            "id": "openai",
            "path_prefix": "/openai/",
            "credentials": {
                "default": {"file": str(keys_dir / "openai")},
                "by_group": {"research": {"file": str(keys_dir / "openai-research")}},
            },
        },
        {
            "id": "anthropic",
            "path_prefix": "/anthropic/",
            "credentials": {"default": {"env": "DEMO_ANTHROPIC_API_KEY"}},
        },
        # Bring your own key: no credentials, the caller's key passes through.
        {"id": "workers-ai", "path_prefix": "/workers-ai/", "pricing_provider": "cloudflare"},
    ]
    pricing = {
        "unknown_model": "reject",
        "overrides": [
            {
                "provider": "cloudflare",
                "model": WORKERS_MODEL,
                "input_per_mtok": 1,
                "output_per_mtok": 2,
            }
        ],
    }
    config = demo_config(
        issuer, jwks, f"sqlite:///{workdir}/s.db", providers=providers, pricing=pricing
    )
    accepted = {"openai": [OPENAI_KEY, RESEARCH_KEY, ROTATED_KEY], "anthropic": [ANTHROPIC_KEY]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIDECAR_INGRESS_TOKEN", INGRESS_TOKEN)
        with running_stack(workdir, issuer, config, provider_keys=accepted) as running:
            yield running


# --- helpers ------------------------------------------------------------------------------


def user(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}@keys.test"


def last_seen(stack: Stack) -> dict[str, Any]:
    seen = stack.seen()
    assert seen, "nothing reached the provider"
    return seen[-1]


def openai_client(
    stack: Stack, api_key: str, prefix: str = "/openai", headers: dict[str, str] | None = None
) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.envoy_url}{prefix}/v1",
        api_key=api_key,
        default_headers=headers,
        max_retries=0,
        timeout=30,
    )


def usage_row(stack: Stack, email: str) -> dict[str, Any] | None:
    with stack.admin() as admin:
        response = admin.get("/v1/usage", params={"group_by": "user"})
    assert response.status_code == 200, response.text
    rows = json.loads(response.text, parse_float=Decimal)["result"]
    return next((r for r in rows if r["user"] == email), None)


def price_micros(model: str, provider: str, body: dict[str, Any]) -> int:
    return genai_micros(expected_usage("openai_chat", body), model, provider)


def service_token(stack: Stack, name: str) -> dict[str, str]:
    with stack.admin() as admin:
        created = admin.post("/v1/service-tokens", json={"name": name, "groups": ["agents"]})
    assert created.status_code == 201, created.text
    token = created.json()["result"]
    return {
        "cf-access-client-id": token["client_id"],
        "cf-access-client-secret": token["client_secret"],
    }


# --- keys arrive, credentials do not -------------------------------------------------------


def test_openai_sdk_jwt_call_reaches_provider_with_key_and_without_jwt(
    stack: Stack, issuer: DevIssuer
) -> None:
    jwt = issuer.mint(user("ann"), ["ml"])
    stack.clear_seen()
    reply = openai_client(stack, jwt).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=8
    )
    assert reply.choices
    arrived = last_seen(stack)["headers"]
    assert arrived["authorization"] == f"Bearer {OPENAI_KEY}"
    assert all(jwt not in value for value in arrived.values())


def test_anthropic_sdk_jwt_call_reaches_provider_with_key_and_without_jwt(
    stack: Stack, issuer: DevIssuer
) -> None:
    jwt = issuer.mint(user("ben"), ["ml"])
    client = anthropic.Anthropic(
        base_url=stack.envoy_url + "/anthropic", api_key=jwt, max_retries=0, timeout=30
    )
    stack.clear_seen()
    message = client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=MESSAGES)
    assert message.content
    arrived = last_seen(stack)["headers"]
    assert arrived["x-api-key"] == ANTHROPIC_KEY
    assert arrived["anthropic-version"]  # the SDK's own, kept
    assert all(jwt not in value for value in arrived.values())


def test_research_group_caller_gets_the_research_key(stack: Stack, issuer: DevIssuer) -> None:
    jwt = issuer.mint(user("rae"), ["research", "ml"])
    stack.clear_seen()
    openai_client(stack, jwt).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=8
    )
    assert last_seen(stack)["headers"]["authorization"] == f"Bearer {RESEARCH_KEY}"


def test_client_bearer_key_is_replaced_with_credentials_and_passed_without(stack: Stack) -> None:
    agent = service_token(stack, f"agent-{uuid.uuid4().hex[:6]}")
    stack.clear_seen()
    openai_client(stack, CLIENT_KEY, headers=agent).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=8
    )
    replaced = last_seen(stack)["headers"]
    assert replaced["authorization"] == f"Bearer {OPENAI_KEY}"
    assert all(CLIENT_KEY not in value for value in replaced.values())
    stack.clear_seen()
    openai_client(stack, CLIENT_KEY, "/workers-ai", headers=agent).chat.completions.create(
        model=WORKERS_MODEL, messages=MESSAGES, max_tokens=8
    )
    passed = last_seen(stack)["headers"]
    assert passed["authorization"] == f"Bearer {CLIENT_KEY}"
    assert "cf-access-client-secret" not in passed


def test_rotated_key_file_is_used_on_the_next_request_without_restart(
    stack: Stack, issuer: DevIssuer, keys_dir: Path
) -> None:
    jwt = issuer.mint(user("rot"), ["ml"])
    pid = stack.sidecars[0].pid
    # As a Kubernetes Secret volume rotates: a new file swapped in atomically.
    staged = keys_dir / ".openai.new"
    staged.write_text(ROTATED_KEY + "\n")
    os.replace(staged, keys_dir / "openai")
    stack.clear_seen()
    openai_client(stack, jwt).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=8
    )
    assert last_seen(stack)["headers"]["authorization"] == f"Bearer {ROTATED_KEY}"
    assert stack.sidecars[0].is_running() and stack.sidecars[0].pid == pid


# --- what provider errors cost ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, openai.AuthenticationError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
    ],
)
def test_provider_error_costs_nothing_and_shows_as_an_error(
    stack: Stack, issuer: DevIssuer, status: int, error: type[Exception]
) -> None:
    email = user(f"err{status}")
    jwt = issuer.mint(email)
    with pytest.raises(error):
        openai_client(stack, jwt).chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=500,
            extra_headers={"x-fake-status": str(status)},
        )
    row = eventually(lambda: usage_row(stack, email), what=f"{email} in /v1/usage")
    assert (row["cost_usd"], row["requests"], row["errors"]) == (0, 1, 1)
    response = httpx.get(
        stack.admin_url + "/v1/budgets/me", headers={"authorization": f"Bearer {jwt}"}, timeout=10
    )
    assert all(b["spent"] == 0 and b["reserved"] == 0 for b in response.json()["result"])


def test_provider_success_is_charged_exactly_as_before(stack: Stack, issuer: DevIssuer) -> None:
    email = user("paid")
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 16}
    openai_client(stack, issuer.mint(email)).chat.completions.create(**body)
    want = price_micros("gpt-4o-mini", "openai", body)
    row = eventually(lambda: usage_row(stack, email), what=f"{email} in /v1/usage")
    assert int(row["cost_usd"] * 1_000_000) == want and row["errors"] == 0


# --- the key appears nowhere but upstream ----------------------------------------------------


def test_authz_answer_carries_the_key_only_for_the_ingress(stack: Stack, issuer: DevIssuer) -> None:
    headers = {
        "authorization": f"Bearer {issuer.mint(user('ngx'))}",
        "x-sidecar-model": "gpt-4o-mini",
    }
    url = stack.admin_url + "/authz/openai/v1/chat/completions"
    caller = httpx.post(url, headers=headers, timeout=10)
    assert caller.status_code == 200
    assert "authorization" not in caller.headers
    ingress = httpx.post(
        url, headers={**headers, "x-sidecar-ingress-token": INGRESS_TOKEN}, timeout=10
    )
    assert ingress.headers["authorization"].startswith("Bearer sk-org-")


def test_key_is_absent_from_logs_and_every_admin_answer(stack: Stack, issuer: DevIssuer) -> None:
    jwt = issuer.mint(user("audit"), ["platform-admins"])
    # A call whose answer the client sees in full: body and headers hold no key.
    answer = httpx.post(
        stack.envoy_url + "/openai" + CHAT,
        timeout=30,
        headers={"authorization": f"Bearer {jwt}"},
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 4},
    )
    seen_by_client = [answer.text, json.dumps(dict(answer.headers))]
    refused = httpx.post(
        stack.envoy_url + "/openai" + CHAT,
        timeout=30,
        headers={"authorization": f"Bearer {jwt}", "x-fake-status": "401"},
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
    )
    seen_by_client += [refused.text, json.dumps(dict(refused.headers))]
    with stack.admin() as admin:
        for path in (
            "/readyz",
            "/healthz",
            "/metrics",
            "/v1/service-tokens",
            "/v1/spend-limits",
            "/dashboard",
            "/v1/usage?group_by=user,model,provider",
        ):
            response = admin.get(path)
            assert response.status_code == 200, path
            seen_by_client += [response.text, json.dumps(dict(response.headers))]
    me = httpx.get(
        stack.admin_url + "/v1/budgets/me", timeout=10, headers={"authorization": f"Bearer {jwt}"}
    )
    seen_by_client.append(me.text)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert cli.main(["check-config", str(stack.config_path)]) == 0
    seen_by_client += [out.getvalue(), err.getvalue()]
    assert "provider_keys" in out.getvalue()
    logs = [
        p.read_text(encoding="utf-8", errors="replace")
        for p in stack.workdir.glob("*.log")
        if p.name.startswith(("sidecar", "envoy"))
    ]
    assert len(logs) >= 2 and any('"decision"' in text for text in logs)
    for key in (OPENAI_KEY, RESEARCH_KEY, ROTATED_KEY, ANTHROPIC_KEY):
        for text in [*seen_by_client, *logs]:
            assert key not in text


def test_missing_key_file_fails_check_config_with_its_path(tmp_path: Path, stack: Stack) -> None:
    config = yaml.safe_load(stack.config_path.read_text())
    missing = tmp_path / "absent" / "openai"
    config["providers"][0]["credentials"]["default"] = {"file": str(missing)}
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        assert cli.main(["check-config", str(path)]) == 1
    assert f"providers[0].credentials.default: file {missing}" in err.getvalue()
