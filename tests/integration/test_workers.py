"""`sidecar serve --workers 2`: both workers answer on the shared ports, /metrics sums them,
a crashed worker is replaced, and SIGTERM to the parent stops every one of them."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from devtools.config import demo_config, demo_key_env
from devtools.keys import DevIssuer
from devtools.procs import LOOPBACK, ManagedProcess, free_port
from devtools.stack import ADMIN_TOKEN, serve_argv, wait_ready
from tests.support.ledger import eventually

BODY = json.dumps(
    {"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
).encode()


class Workers:
    def __init__(self, process: ManagedProcess, grpc_port: int, http_port: int, token: str) -> None:
        self.process = process
        self.grpc_port = grpc_port
        self.http_url = f"http://{LOOPBACK}:{http_port}"
        self.token = token
        self.checks = 0

    def children(self) -> set[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return {int(pid) for pid in path.read_text().split()}

    def wait_children(
        self, count: int, exclude: frozenset[int] = frozenset(), timeout: float = 30
    ) -> set[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kids = self.children()
            if len(kids) == count and not kids & exclude:
                return kids
            time.sleep(0.1)
        raise AssertionError(f"expected {count} workers, have {self.children()}")

    def check(self) -> None:
        """One Check on a new connection: the kernel picks a worker per connection."""
        request = external_auth_pb2.CheckRequest()
        http = request.attributes.request.http
        http.method, http.path, http.raw_body = "POST", "/openai/v1/chat/completions", BODY
        http.headers["cf-access-jwt-assertion"] = self.token
        http.headers["x-request-id"] = f"workers-{self.checks}"
        with grpc.insecure_channel(f"{LOOPBACK}:{self.grpc_port}") as channel:
            response = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=10)
        assert response.status.code == 0, response
        self.checks += 1

    def decision_pids(self) -> list[int]:
        lines = self.process.log_path.read_text(encoding="utf-8").splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        return [e["pid"] for e in events if e.get("event") == "decision"]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    issuer = DevIssuer.generate()
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(
        yaml.safe_dump(demo_config(issuer, str(jwks), f"sqlite:///{tmp_path}/sidecar.db"))
    )
    grpc_port, http_port = free_port(), free_port()
    argv = serve_argv(config_path, grpc_port, http_port, workers=2)
    process = ManagedProcess(
        "sidecar-workers",
        argv,
        tmp_path,
        cwd=tmp_path,
        env={**os.environ, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN, **demo_key_env()},
    )
    with process:
        running = Workers(process, grpc_port, http_port, issuer.mint("ann@example.com"))
        running.wait_children(2)
        wait_ready(running.http_url, process, timeout=60)
        yield running
        process.stop(timeout=30)


def test_both_workers_answer_and_metrics_sum_them(workers: Workers) -> None:
    pids = workers.wait_children(2)
    # Connections are spread by a hash once both workers listen; a worker still starting
    # (a cold start loads the price data) gets none yet, so keep checking, bounded.
    deadline = time.monotonic() + 60
    for _ in range(400):
        workers.check()
        if workers.checks >= 40 and set(workers.decision_pids()) == pids:
            break
        if time.monotonic() > deadline:
            break

    # A decision line is written at the worker's next turn of its event loop, which may
    # come just after the answer: wait for the last ones.
    def all_logged() -> list[int] | None:
        found = workers.decision_pids()
        return found if len(found) >= workers.checks else None

    decided = eventually(all_logged, what="a decision line per check")
    assert set(decided) == pids
    assert len(decided) == workers.checks
    # Any worker's /metrics counts the decisions of all of them.
    for _ in range(4):
        text = httpx.get(workers.http_url + "/metrics", timeout=5).text
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("sidecar_decisions_total{")
        )
        assert total == workers.checks


def test_crashed_worker_is_replaced_and_sigterm_stops_all(workers: Workers) -> None:
    first = workers.wait_children(2)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    replaced = workers.wait_children(2, exclude=frozenset({victim}))
    assert len(replaced & first) == 1
    wait_ready(workers.http_url, workers.process, timeout=60)
    for _ in range(10):
        workers.check()

    os.kill(workers.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while workers.process.is_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers.process.returncode == 0, workers.process.log_tail()
    for pid in replaced:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
