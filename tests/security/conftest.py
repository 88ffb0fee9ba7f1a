"""A sidecar's HTTP app over a real SQLite store, device login on, and its cast of callers."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet
from starlette.testclient import TestClient

from sidecar.demo.config import demo_config
from sidecar.demo.keys import DevIssuer
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


def device_token(client: TestClient, approver: dict[str, str],
                 user_agent: str = "sidecar-cli/1.0") -> str:
    """The whole device flow: code, approval page, approve, poll once."""
    started = client.post("/device/code", data={"client_id": "sidecar-cli"},
                          headers={"user-agent": user_agent})
    assert started.status_code == 200, started.text
    code = started.json()
    page = client.get("/device", params={"user_code": code["user_code"]}, headers=approver)
    assert page.status_code == 200, page.text
    csrf, user_code = CSRF.search(page.text), HIDDEN_CODE.search(page.text)
    assert csrf is not None and user_code is not None
    approved = client.post("/device/approve", headers=approver, data={
        "user_code": user_code.group(1), "action": "approve", "csrf_token": csrf.group(1)})
    assert approved.status_code == 200, approved.text
    answer = client.post("/device/token", data={"grant_type": GRANT_TYPE,
                                                "device_code": code["device_code"]})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


@pytest.fixture
def make_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[Callable[..., Site]]:
    built: list[Services] = []
    issuer = DevIssuer.generate()
    secret_key = Fernet.generate_key().decode()
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("SIDECAR_SECRET_KEY", secret_key)

    def make(**overrides: Any) -> Site:
        jwks = issuer.write_jwks(tmp_path / "jwks.json")
        config = demo_config(issuer, str(jwks), f"sqlite:///{tmp_path}/sidecar.db",
                             **overrides)
        config["identity"]["device_login"] = {"enabled": True, "token_ttl": "1h",
                                              "public_url": PUBLIC_URL}
        config["store"] = {"url": f"sqlite:///{tmp_path}/sidecar.db",
                           "spool": str(tmp_path / "spool.db")}
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
