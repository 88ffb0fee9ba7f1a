"""Graceful shutdown: on SIGTERM, health turns NOT_SERVING, an in-flight stream finishes, and
its actual cost is committed before the process exits."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import httpx
import openai
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import running_stack
from sidecar.store.sqlite_store import SQLiteStore


def health(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError as err:
            return f"error:{err.code().name}"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_sigterm_drains_a_stream_and_commits_it(tmp_path: Path, issuer: DevIssuer) -> None:
    workdir = tmp_path / "stack"
    jwks = str(issuer.write_jwks(tmp_path / "jwks.json"))
    config = demo_config(issuer, jwks, f"sqlite:///{workdir}/s.db")
    with running_stack(workdir, issuer, config) as stack:
        assert health(stack.grpc_port) == "SERVING"
        client = openai.OpenAI(
            base_url=stack.envoy_url + "/openai/v1",
            api_key=issuer.mint("drain@example.com"),
            default_headers={"x-fake-delay-ms": "150"},
            max_retries=0,
        )
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "count slowly"}],
        )
        chunks = iter(stream)
        next(chunks)
        sidecar = stack.sidecars[0]
        started = time.monotonic()
        sidecar._require_started().send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert health(stack.grpc_port) in ("NOT_SERVING", "error:UNAVAILABLE")
        assert httpx.get(stack.admin_url + "/readyz", timeout=5).status_code == 503
        rest = list(chunks)
        usage = rest[-1].usage
        assert usage is not None and usage.completion_tokens == 20
        assert sidecar._require_started().wait(20) == 0
        assert time.monotonic() - started < 15

    async def ledger() -> int:
        store = SQLiteStore(f"sqlite:///{workdir}/s.db")
        try:
            rows = await store.ledger_rows(0, 2**40)
            return sum(r.output_tokens for r in rows if r.dims.user == "drain@example.com")
        finally:
            await store.close()

    assert asyncio.run(ledger()) == 20
