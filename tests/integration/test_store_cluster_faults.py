"""A Redis Cluster primary killed: only what lives on its shard fails, and it fails closed;
with a replica, the replica takes over its shard, state included.

Budget state is sharded by bucket owner, so a decision needs the shards of its buckets and
nothing else: not even the shard its request id hashes to (where a pointer to its record is
kept, a shortcut for commits).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from devtools.redis_cluster import LocalCluster, start_redis_cluster
from sidecar.model import TokenUsage
from sidecar.store.base import ShardUnavailable, StoreUnavailable
from sidecar.store.budget_types import BucketView, ReserveRequest
from sidecar.store.redis_keys import DEFAULT_PREFIX, KeyKind, redis_key
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


def name_on(cluster: LocalCluster, shard: int, kind: KeyKind, pattern: str) -> str:
    """A name (pattern.format(n)) whose `kind` key lives on primary `shard`."""
    for n in range(10_000):
        name = pattern.format(n)
        if owner(cluster, redis_key(DEFAULT_PREFIX, kind, name)) == shard:
            return name
    raise AssertionError("no name found for the shard")


def collection_on(cluster: LocalCluster, shard: int) -> str:
    return name_on(cluster, shard, "docs", "col{}")


def user_bucket(cluster: LocalCluster, shard: int) -> BucketView:
    """A per-user daily bucket whose owner's buckets live on primary `shard`."""
    key = name_on(cluster, shard, "bucket", "daily|fixed:daily|user=u{}@example.com")
    return BucketView(key, DAY, DAY, 90_000, 1_000_000)


def request(rid: str, *buckets: BucketView) -> ReserveRequest:
    return ReserveRequest(rid, buckets, 1_000, "reserve", DAY + 10.0, DAY + 70.0)


@asynccontextmanager
async def open_store(cluster: LocalCluster) -> AsyncIterator[RedisStore]:
    store = RedisStore(cluster.url, connect_timeout=0.5, op_timeout=0.5)
    try:
        yield store
    finally:
        await store.close()


def kill(cluster: LocalCluster, shard: int) -> None:
    os.kill(cluster.processes[shard].pid, signal.SIGKILL)
    cluster.processes[shard].stop()  # reaps it


async def test_killing_one_primary_fails_only_what_lives_on_it(cluster: LocalCluster) -> None:
    async with open_store(cluster) as store:
        doomed, left, right = 0, 1, 2
        on_doomed, on_left, on_right = (user_bucket(cluster, s) for s in (doomed, left, right))
        # Request ids whose pointer lives on the shard that goes down.
        rid = [name_on(cluster, doomed, "home", f"ok{n}-{{}}") for n in range(3)]
        docs_doomed, docs_kept = collection_on(cluster, doomed), collection_on(cluster, right)
        for name in (docs_doomed, docs_kept):
            await store.put_doc(name, "k", {"v": name}, now=DAY)
        # Before: one request spans all three shards (its record on its first bucket's).
        assert (await store.reserve(request(rid[2], on_left, on_doomed, on_right))).admitted

        kill(cluster, doomed)
        # Buckets on the shards that are up still get decisions, and commit.
        started = time.monotonic()
        assert (await store.reserve(request(rid[0], on_left, on_right))).admitted
        assert (await store.commit(rid[0], 900, TokenUsage(1, 1), DAY + 11.0)).status == "committed"
        assert time.monotonic() - started < 10
        # A request with a bucket on the dead shard fails closed (as one shard's failure,
        # which the engine does not take for the whole store's), and what the other shards
        # held for it is let go: it never lingers as room taken.
        with pytest.raises(ShardUnavailable):
            await store.reserve(request(rid[1], on_left, on_doomed))
        assert (await store.bucket_states([on_left], DAY + 12.0))[0].reserved == 1_000
        # Documents likewise: the dead shard's collection fails, the others serve on.
        with pytest.raises(StoreUnavailable):
            await store.get_doc(docs_doomed, "k", now=DAY)
        assert await store.get_doc(docs_kept, "k", now=DAY) == {"v": docs_kept}
        # Ready while shards answer; the expiry sweep runs on the shards that are up: the
        # request spanning all three is settled where it can be.
        assert await store.ping()
        assert await store.open_reservations() == 1  # the one spanning all three
        assert await store.settle_expired(DAY + 100.0) == 1
        assert await store.open_reservations() == 0
        state = (await store.bucket_states([on_right], DAY + 100.0))[0]
        assert (state.spent, state.reserved) == (900 + 1_000, 0)


async def test_reads_on_a_dead_primary_never_fail_reads_in_flight_on_the_others(
    cluster: LocalCluster,
) -> None:
    async with open_store(cluster) as store:
        on_doomed, on_kept = user_bucket(cluster, 0), user_bucket(cluster, 1)
        assert (await store.reserve(request("before-kill", on_kept))).admitted
        kill(cluster, 0)
        for _ in range(8):
            # A read of the dead shard fails while reads of a healthy one are in flight:
            # what it does to the client's connections must not cut theirs.
            replies = await asyncio.gather(
                store.bucket_states([on_doomed], DAY + 12.0),
                *(store.bucket_states([on_kept], DAY + 12.0) for _ in range(8)),
                return_exceptions=True,
            )
            assert isinstance(replies[0], StoreUnavailable)
            for reply in replies[1:]:
                assert not isinstance(reply, BaseException), reply
                assert reply[0].reserved == 1_000


def wait_for_promotion(cluster: LocalCluster, shard: int, timeout: float = 30.0) -> None:
    """Until every live node names `shard`'s replica as the primary of its slots."""
    replica = cluster.replica_ports[shard]
    live = [p for i, p in enumerate(cluster.ports) if i != shard] + [replica]
    deadline = time.monotonic() + timeout
    while True:
        primaries = set()
        for port in live:
            with redis.Redis(port=port) as client:
                for _start, _end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                    primaries.add(int(primary[1]))
        if replica in primaries and cluster.ports[shard] not in primaries:
            return
        assert time.monotonic() < deadline, "the replica was never promoted"
        time.sleep(0.1)  # waiting on the cluster's own failover, not on our code


async def test_a_promoted_replica_serves_its_dead_primarys_buckets_with_their_state(
    tmp_path: Path,
) -> None:
    with start_redis_cluster(tmp_path, replicas=1) as cluster:
        async with open_store(cluster) as store:
            bucket, docs = user_bucket(cluster, 0), collection_on(cluster, 0)
            await store.put_doc(docs, "k", {"v": 1}, now=DAY)
            assert (await store.reserve(request("before", bucket))).admitted
            committed = await store.commit("before", 900, TokenUsage(1, 1), DAY + 11.0)
            assert committed.status == "committed"
            with redis.Redis(port=cluster.ports[0]) as primary:
                # Everything the primary holds has reached its replica.
                assert primary.execute_command("WAIT", 1, 5000) == 1

            kill(cluster, 0)
            wait_for_promotion(cluster, 0)
            # The client learns the new layout by itself: the first calls already succeed,
            # on the state the replica carried over.
            assert (await store.reserve(request("after", bucket))).admitted
            state = (await store.bucket_states([bucket], DAY + 12.0))[0]
            assert (state.spent, state.reserved) == (900, 1_000)
            assert await store.get_doc(docs, "k", now=DAY) == {"v": 1}
            assert (await store.commit("after", 50, TokenUsage(1, 1), DAY + 13.0)).status == (
                "committed"
            )
            # A repeat of the committed request is known as one on the new primary.
            repeat = await store.commit("before", 900, TokenUsage(1, 1), DAY + 14.0)
            assert repeat.status == "duplicate"
            state = (await store.bucket_states([bucket], DAY + 14.0))[0]
            assert (state.spent, state.reserved) == (950, 0)


async def test_a_store_started_while_a_primary_is_down_serves_the_other_shards(
    cluster: LocalCluster,
) -> None:
    # The first primary: the node redis-py would have asked for its command table.
    on_doomed, on_left, on_right = (user_bucket(cluster, s) for s in (0, 1, 2))
    kill(cluster, 0)
    async with open_store(cluster) as store:
        assert (await store.reserve(request("left", on_left))).admitted
        assert (await store.reserve(request("right", on_right))).admitted
        assert (await store.commit("right", 900, TokenUsage(1, 1), DAY + 11.0)).status == (
            "committed"
        )
        with pytest.raises(ShardUnavailable):
            await store.reserve(request("doomed", on_doomed))
        states = await store.bucket_states([on_left, on_right], DAY + 12.0)
        assert [(s.spent, s.reserved) for s in states] == [(0, 1_000), (900, 0)]


async def test_a_hung_primary_fails_only_its_shard_and_serves_again_once_it_resumes(
    cluster: LocalCluster,
) -> None:
    hung = cluster.processes[0].pid
    assert hung is not None
    async with open_store(cluster) as store:
        on_hung, on_kept = user_bucket(cluster, 0), user_bucket(cluster, 1)
        assert (await store.reserve(request("before", on_hung))).admitted
        os.kill(hung, signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            started = time.monotonic()
            replies = await asyncio.gather(
                store.reserve(request("hung", on_hung)),
                *(store.reserve(request(f"kept{n}", on_kept)) for n in range(4)),
                store.bucket_states([on_kept], DAY + 12.0),
                return_exceptions=True,
            )
            # It fails as the hung shard's failure, by the op timeout, not never.
            assert isinstance(replies[0], ShardUnavailable)
            assert time.monotonic() - started < 10
            for reply in replies[1:]:
                assert not isinstance(reply, BaseException), reply
        finally:
            os.kill(hung, signal.SIGCONT)
        assert (await store.reserve(request("after", on_hung))).admitted
        # The hung shard may yet have run the reserve it got: the engine queues a $0
        # charge for a failed reserve, which lets go of it if so.
        await store.commit("hung", 0, TokenUsage(0, 0), DAY + 12.0)
        states = await store.bucket_states([on_hung, on_kept], DAY + 12.0)
        assert [(s.spent, s.reserved) for s in states] == [(0, 2_000), (0, 4_000)]
