"""Fixtures shared by every test package: a real redis-server, a store per backend, and the
demo provider keys in the environment (the demo config reads its keys from there)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from devtools.config import demo_key_env
from devtools.procs import start_redis
from devtools.redis_cluster import LocalCluster, start_redis_cluster
from sidecar.store.base import Store
from sidecar.store.factory import open_store
from tests.support.backends import backend_url
from tests.support.redis_admin import flush_redis
from tests.support.store_clock import StoreClock


@pytest.fixture(scope="session", autouse=True)
def demo_provider_keys() -> None:
    # Session-wide, before any module-scoped fixture builds an in-process sidecar.
    os.environ.update(demo_key_env())


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, port = start_redis(tmp_path_factory.mktemp("redis"))
    with proc:
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real Redis Cluster of three primaries on loopback ports."""
    with start_redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "sqlite-owned", "redis", "cluster"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Every backend: SQLite shared by processes, SQLite owned by one process (budgets in
    its memory), one Redis, a Redis Cluster."""
    url = backend_url(request, request.param, tmp_path)
    if not request.param.startswith("sqlite"):
        await flush_redis(url)
    st = await open_store(url, owner=True if request.param == "sqlite-owned" else None)
    try:
        yield st
    finally:
        await st.close()


@pytest.fixture
def store_clock() -> StoreClock:
    """The time a test of the `store` fixture runs at (see StoreClock)."""
    return StoreClock(1_800_000_000.0)
