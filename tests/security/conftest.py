"""Shared by the attack reproductions: a sidecar's HTTP app over a real SQLite store with
device login on (`site`), and a whole running stack — fake provider, sidecar, Envoy —
(`stack`), with the helpers to read what each charged."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import openai
import pytest
import yaml
from cryptography.fernet import Fernet
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from starlette.testclient import TestClient

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack
from sidecar.http.app import create_app
from sidecar.services import Services, build_services

ADMIN_TOKEN = "security-admin-token-0123456789"
PUBLIC_URL = "http://sidecar.test"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
HIDDEN_CODE = re.compile(r'name="user_code" value="([^"]+)"')
# Every failed-attempt window the tests look at is open for a while after this instant.
FROZEN = float(int(time.time()) // 3600 * 3600 + 1)


@dataclass
class Site:
    services: Services
    issuer: DevIssuer
    secret_key: str

    def client(self, peer: str = "192.0.2.10") -> TestClient:
        return TestClient(create_app(self.services), base_url=PUBLIC_URL, client=(peer, 50000))

    def person(self, email: str, groups: list[str] | None = None) -> dict[str, str]:
        """A browser behind Access: the CF_Authorization cookie."""
        return {"cookie": f"CF_Authorization={self.issuer.mint(email, groups)}"}

    def admin_person(self) -> dict[str, str]:
        return self.person("root@example.com", ["platform-admins"])


def admin_token() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN_TOKEN}"}


def device_token(
    client: TestClient, approver: dict[str, str], user_agent: str = "sidecar-cli/1.0"
) -> str:
    """The whole device flow: code, approval page, approve, poll once."""
    started = client.post(
        "/device/code", data={"client_id": "sidecar-cli"}, headers={"user-agent": user_agent}
    )
    assert started.status_code == 200, started.text
    code = started.json()
    page = client.get("/device", params={"user_code": code["user_code"]}, headers=approver)
    assert page.status_code == 200, page.text
    csrf, user_code = CSRF.search(page.text), HIDDEN_CODE.search(page.text)
    assert csrf is not None and user_code is not None
    approved = client.post(
        "/device/approve",
        headers=approver,
        data={"user_code": user_code.group(1), "action": "approve", "csrf_token": csrf.group(1)},
    )
    assert approved.status_code == 200, approved.text
    answer = client.post(
        "/device/token", data={"grant_type": GRANT_TYPE, "device_code": code["device_code"]}
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


@pytest.fixture
def make_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Site]]:
    built: list[Services] = []
    issuer = DevIssuer.generate()
    secret_key = Fernet.generate_key().decode()
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("SIDECAR_SECRET_KEY", secret_key)

    def make(**overrides: Any) -> Site:
        jwks = issuer.write_jwks(tmp_path / "jwks.json")
        config = demo_config(issuer, str(jwks), f"sqlite:///{tmp_path}/sidecar.db", **overrides)
        config["identity"]["device_login"] = {
            "enabled": True,
            "token_ttl": "1h",
            "public_url": PUBLIC_URL,
        }
        config["store"] = {
            "url": f"sqlite:///{tmp_path}/sidecar.db",
            "spool": str(tmp_path / "spool.db"),
        }
        path = tmp_path / "sidecar.yaml"
        path.write_text(yaml.safe_dump(config))
        services = asyncio.run(build_services(path))
        services.engine.clock = lambda: FROZEN
        built.append(services)
        return Site(services, issuer, secret_key)

    yield make
    for services in built:
        asyncio.run(services.close())


@pytest.fixture
def site(make_site: Callable[..., Site]) -> Site:
    return make_site()


T = TypeVar("T")
# A model priced so the arithmetic is plain: $0.001 an output token, input free; each
# caller may spend $0.003 a day on it, so one 2-token reservation fits and two do not.
REPLAY_MODEL = "replay-model"
REPLAY_PRICE = {
    "provider": "openai",
    "model": REPLAY_MODEL,
    "input_per_mtok": 0,
    "output_per_mtok": 1000,
}
REPLAY_LIMIT = {
    "name": "replay-daily",
    "budget_usd": 0.003,
    "window": {"fixed": "daily"},
    "filter": {"model": [REPLAY_MODEL]},
    "split": ["user"],
    "action": "block",
}
# A small default output reservation: a call that names no limit must still pay for what
# it really produced.
ADMISSION = {"mode": "reserve", "default_max_output_tokens": 2, "reservation_ttl": "60s"}


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    return DevIssuer.generate()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("security")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    config = demo_config(
        issuer,
        jwks,
        f"sqlite:///{workdir}/s.db",
        spend_limits=[REPLAY_LIMIT],
        admission=ADMISSION,
        pricing={"unknown_model": "reject", "overrides": [REPLAY_PRICE]},
    )
    with running_stack(workdir, issuer, config) as running:
        yield running


def user(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}@attack.test"


def micros(usd: Decimal | float | int) -> int:
    return int(Decimal(str(usd)) * 1_000_000)


def my_budgets(stack: Stack, token: str) -> list[dict[str, Any]]:
    response = httpx.get(
        stack.admin_url + "/v1/budgets/me", headers={"authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return list(json.loads(response.text, parse_float=Decimal)["result"])


def check_request(
    headers: dict[str, str], body: dict[str, Any], path: str = "/openai/v1/chat/completions"
) -> Any:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST",
        path=path,
        raw_body=json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers},
    )
    context = attribute_context_pb2.AttributeContext
    return external_auth_pb2.CheckRequest(attributes=context(request=context.Request(http=http)))


def check(
    stack: Stack,
    headers: dict[str, str],
    body: dict[str, Any],
    path: str = "/openai/v1/chat/completions",
    credentials: grpc.ChannelCredentials | None = None,
) -> Any:
    """The CheckRequest Envoy would send, straight to the sidecar's gRPC port."""
    request = check_request(headers, body, path)
    target = f"127.0.0.1:{stack.grpc_port}"
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        return external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=10)


def openai_client(stack: Stack, token: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.envoy_url + "/openai/v1",
        api_key=token,
        max_retries=0,
        timeout=60,
        default_headers=headers or None,
    )
