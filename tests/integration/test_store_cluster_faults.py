"""A Redis Cluster primary killed: only the keys on its shard fail, and they fail closed."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from sidecar.demo.redis_cluster import LocalCluster, start_redis_cluster
from sidecar.model import TokenUsage
from sidecar.store.base import StoreUnavailable
from sidecar.store.budget_types import BucketView, ReserveRequest
from sidecar.store.redis_keys import DEFAULT_PREFIX, redis_key
from sidecar.store.redis_store import RedisStore

DAY = 1_800_000_000 // 86400 * 86400


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    # Its own cluster: this test kills nodes.
    with start_redis_cluster(tmp_path) as running:
        yield running


def owner(cluster: LocalCluster, key: str) -> int:
    """The index (into cluster.ports) of the primary serving `key`."""
    slot = key_slot(key.encode())
    with redis.Redis(port=cluster.ports[0]) as client:
        for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return cluster.ports.index(int(primary[1]))
    raise AssertionError(f"slot {slot} is not served")


def collection_on(cluster: LocalCluster, shard: int) -> str:
    """A document collection whose keys live on primary `shard`."""
    for n in range(10_000):
        name = f"col{n}"
        if owner(cluster, redis_key(DEFAULT_PREFIX, "docs", name)) == shard:
            return name
    raise AssertionError("no collection found for the shard")


def request(n: int) -> ReserveRequest:
    view = BucketView("team|daily", DAY, DAY, 90_000, 1_000_000)
    return ReserveRequest(f"r{n}", (view,), 1_000, "reserve", DAY + 10.0, DAY + 70.0)


def kill(cluster: LocalCluster, shard: int) -> None:
    os.kill(cluster.processes[shard].pid, signal.SIGKILL)
    cluster.processes[shard].stop()  # reaps it


async def test_killing_one_primary_fails_only_the_keys_on_it(cluster: LocalCluster) -> None:
    store = RedisStore(cluster.url, connect_timeout=0.5, op_timeout=0.5)
    try:
        budget = owner(cluster, redis_key(DEFAULT_PREFIX, "open"))
        other, third = [i for i in range(3) if i != budget]
        doomed, kept = collection_on(cluster, other), collection_on(cluster, budget)
        survivor = collection_on(cluster, third)
        for name in (doomed, kept):
            await store.put_doc(name, "k", {"v": name}, now=DAY)
        assert (await store.reserve(request(1))).admitted

        kill(cluster, other)
        with pytest.raises(StoreUnavailable):
            await store.get_doc(doomed, "k", now=DAY)
        # The other shards serve on: documents, and the budgets (all on one shard).
        assert await store.get_doc(kept, "k", now=DAY) == {"v": kept}
        assert (await store.reserve(request(2))).admitted
        assert (await store.commit("r2", 900, TokenUsage(1, 1), DAY + 11.0)).status == \
            "committed"
        assert await store.ping()

        kill(cluster, budget)
        # Budget state is gone with its shard: decisions fail closed, never admit blind.
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.reserve(request(3))
        assert time.monotonic() - started < 10
        assert not await store.ping()
        await store.put_doc(survivor, "k", {"v": 1}, now=DAY)
        assert await store.get_doc(survivor, "k", now=DAY) == {"v": 1}
    finally:
        await store.close()
