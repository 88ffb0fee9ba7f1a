"""Fixtures shared by every test package: a real redis-server, a store per backend, and the
demo provider keys in the environment (the demo config reads its keys from there)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sidecar.demo.config import demo_key_env
from sidecar.demo.procs import start_redis
from sidecar.store.base import Store
from sidecar.store.factory import open_store


@pytest.fixture(scope="session", autouse=True)
def demo_provider_keys() -> None:
    # Session-wide, before any module-scoped fixture builds an in-process sidecar.
    os.environ.update(demo_key_env())


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, port = start_redis(tmp_path_factory.mktemp("redis"))
    with proc:
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture(params=["sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str
) -> AsyncIterator[Store]:
    url = f"sqlite:///{tmp_path}/store.db" if request.param == "sqlite" else redis_url
    st = await open_store(url)
    if request.param == "redis":
        await st.flush_for_tests()  # type: ignore[attr-defined]
    try:
        yield st
    finally:
        await st.close()
