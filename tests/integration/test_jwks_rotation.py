"""JWKS served over HTTP by the test: a new key is picked up, a failing fetch keeps old keys."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack


class JwksHost:
    def __init__(self) -> None:
        self.doc: dict[str, Any] = {"keys": []}
        self.failing = False
        self.hits = 0
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.hits += 1
                if host.failing:
                    self.send_response(503)
                    self.end_headers()
                    return
                body = json.dumps(host.doc).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cdn-cgi/access/certs"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def jwks_host() -> Iterator[JwksHost]:
    host = JwksHost()
    yield host
    host.server.shutdown()


@pytest.fixture(scope="module")
def rotating(
    tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer, jwks_host: JwksHost
) -> Iterator[Stack]:
    jwks_host.doc = issuer.jwks()
    workdir: Path = tmp_path_factory.mktemp("rotation")
    config = demo_config(issuer, jwks_host.url, f"sqlite:///{workdir}/s.db")
    with running_stack(workdir, issuer, config) as stack:
        yield stack


def status(stack: Stack, token: str) -> int:
    return httpx.post(
        stack.envoy_url + "/openai/v1/chat/completions",
        headers={"authorization": f"Bearer {token}"},
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        timeout=20,
    ).status_code


def test_rotation_and_outage(rotating: Stack, issuer: DevIssuer, jwks_host: JwksHost) -> None:
    assert status(rotating, issuer.mint("a@example.com")) == 200
    new_key = DevIssuer(issuer.issuer, issuer.audience, DevIssuer.generate().key, "kid-2")
    # Before the new key is published, its tokens are refused.
    assert status(rotating, new_key.mint("b@example.com")) == 401
    jwks_host.doc = issuer.jwks(new_key)
    time.sleep(1.2)  # the refresh floor configured for this issuer
    assert status(rotating, new_key.mint("b@example.com")) == 200
    jwks_host.failing = True
    hits = jwks_host.hits
    time.sleep(1.2)
    # An unknown kid triggers a refresh that fails; the keys already known keep working.
    stranger = DevIssuer(issuer.issuer, issuer.audience, DevIssuer.generate().key, "kid-3")
    assert status(rotating, stranger.mint("c@example.com")) == 401
    assert jwks_host.hits > hits
    assert status(rotating, issuer.mint("d@example.com")) == 200
    assert status(rotating, new_key.mint("e@example.com")) == 200
