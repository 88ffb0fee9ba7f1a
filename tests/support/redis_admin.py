"""What tests do to a Redis they own, which the product store never does: empty it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from sidecar.store.redis_cluster_url import is_cluster_url, parse_cluster_url


@asynccontextmanager
async def _primaries(url: str) -> AsyncIterator[list[Redis]]:
    """One plain client per primary: the server of a one-node URL, each primary of a
    cluster URL (its nodes are listed in the URL the test fixtures make)."""
    if is_cluster_url(url):
        target = parse_cluster_url(url)
        clients = [
            Redis(
                host=host,
                port=port,
                username=target.username,
                password=target.password,
                ssl=target.tls,
                decode_responses=True,
            )
            for host, port in target.nodes
        ]
    else:
        clients = [Redis.from_url(url, decode_responses=True)]
    try:
        primaries = []
        for client in clients:
            role = await client.role()
            if role[0] == "master":
                primaries.append(client)
        yield primaries
    finally:
        for client in clients:
            await client.aclose()


async def flush_redis(url: str) -> None:
    """Empty the database on every primary."""
    async with _primaries(url) as primaries:
        for client in primaries:
            await client.flushdb()


async def flush_functions(url: str) -> None:
    """Delete every Redis Functions library on every primary (FLUSHDB keeps them), as a
    server restarted without persistence would have none."""
    async with _primaries(url) as primaries:
        for client in primaries:
            await client.function_flush()
