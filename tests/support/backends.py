"""Store URLs per test backend, shared by the fixtures that open more than one store."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.redis_cluster import LocalCluster


def backend_url(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, name: str = "store.db"
) -> str:
    """The store URL of one backend: "sqlite" (a file in tmp_path), "redis" (one server)
    or "cluster" (three primaries); the Redis ones start on first use."""
    if backend.startswith("sqlite"):
        return f"sqlite:///{tmp_path}/{name}"
    if backend == "redis":
        return str(request.getfixturevalue("redis_url"))
    cluster: LocalCluster = request.getfixturevalue("redis_cluster")
    return cluster.url
