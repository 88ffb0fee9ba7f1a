"""The script lane over TLS with a password, on both event loops the server runs on: the
connection is set up by redis-py (TLS handshake, AUTH) and then carries the lane's
pipelined calls, whose replies arrive decrypted through the TLS transport."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvloop

from devtools.procs import LOOPBACK, ManagedProcess, free_port, redis_binary, wait_for_port
from sidecar.model import TokenUsage
from sidecar.store.budget_types import BucketView
from sidecar.store.redis_store import RedisStore
from tests.security.certs import Authority
from tests.support.reserve import reserve_request

NOW = 1_800_000_000.0
DAY = 1_799_971_200
PASSWORD = "lane-secret"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    tmp = tmp_path_factory.mktemp("redis-tls")
    ca = Authority(tmp, "redis-ca")
    server = ca.issue("redis-server", server=True)
    port = free_port()
    argv = [
        redis_binary(),
        "--save", "", "--appendonly", "no", "--bind", LOOPBACK, "--port", "0",
        "--tls-port", str(port), "--tls-cert-file", str(server.cert),
        "--tls-key-file", str(server.key), "--tls-ca-cert-file", str(ca.cert),
        "--tls-auth-clients", "no", "--requirepass", PASSWORD, "--dir", str(tmp),
    ]  # fmt: skip
    with ManagedProcess(f"redis-tls-{port}", argv, tmp).start() as process:
        wait_for_port(LOOPBACK, port, 15, process=process)
        client = redis.Redis(
            host=LOOPBACK, port=port, password=PASSWORD, ssl=True, ssl_ca_certs=str(ca.cert)
        )
        assert client.ping()
        client.close()
        yield port, ca.cert


async def _reserve_and_commit_over_tls(port: int, ca: Path) -> None:
    url = f"rediss://:{PASSWORD}@{LOOPBACK}:{port}/0?ssl_ca_certs={ca}"
    st = RedisStore(url)
    try:
        view = BucketView(key="b:tls", slot=DAY, since=DAY, ttl_seconds=90_000, limit=10_000)
        ids = [f"tls-{n}" for n in range(40)]
        # Forty at once: one pipelined connection, every reply to its own call.
        results = await asyncio.gather(
            *(st.reserve(reserve_request(rid, 10, view, now=NOW)) for rid in ids)
        )
        assert all(r.admitted for r in results)
        assert st._lane is not None
        assert st._lane._pipe is not None and not st._lane._pipe.broken
        commits = await asyncio.gather(*(st.commit(rid, 3, TokenUsage(), NOW) for rid in ids))
        assert {c.status for c in commits} == {"committed"}
        (state,) = await st.bucket_states([view], NOW)
        assert (state.spent, state.reserved) == (120, 0)
    finally:
        await st.close()


RUNNERS: dict[str, Callable[[], Any]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_the_lane_carries_pipelined_calls_over_tls_with_a_password(
    tls_redis: tuple[int, Path], loop: str
) -> None:
    port, ca = tls_redis
    with asyncio.Runner(loop_factory=RUNNERS[loop]) as runner:
        runner.run(_cleared(port, ca))
        runner.run(_reserve_and_commit_over_tls(port, ca))


async def _cleared(port: int, ca: Path) -> None:
    client = redis.asyncio.Redis(
        host=LOOPBACK, port=port, password=PASSWORD, ssl=True, ssl_ca_certs=str(ca)
    )
    await client.flushall()
    await client.aclose()
