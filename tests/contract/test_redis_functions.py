"""The budget scripts are one Redis Functions library. A server that lacks it (a new one,
one restarted without persistence, FUNCTION FLUSH) gets it on its next decision, on one
Redis and on every shard of a cluster; the cluster client routes FCALL by its key without
asking a node for the keys; libraries of different code never share function names."""

from __future__ import annotations

from redis.asyncio import Redis

from devtools.redis_cluster import LocalCluster
from sidecar.model import TokenUsage
from sidecar.store.budget_types import BucketView, ReserveRequest
from sidecar.store.redis_functions import Library
from sidecar.store.redis_store import RedisStore
from tests.support.redis_admin import flush_functions, flush_redis

NOW = 1_800_000_000.0
DAY = int(NOW) // 86400 * 86400


def daily(user: str) -> BucketView:
    return BucketView(f"daily|fixed:daily|user={user}", DAY, DAY, 90_000, 1_000)


def request(rid: str, user: str) -> ReserveRequest:
    return ReserveRequest(rid, (daily(user),), 100, "reserve", NOW, NOW + 60)


async def libraries(client: Redis) -> list[str]:
    # RESP2: each library is a flat list of field names and values.
    return [str(lib[lib.index("library_name") + 1]) for lib in await client.function_list()]


async def test_a_redis_without_the_library_gets_it_back_on_the_next_call(
    redis_url: str,
) -> None:
    await flush_redis(redis_url)
    await flush_functions(redis_url)
    store = RedisStore(redis_url, prefix="fn:")
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        assert (await store.reserve(request("r1", "alice"))).admitted
        (name,) = await libraries(client)
        assert name.startswith("sidecar_budget_")
        # Lost again between a reserve and its commit: the commit loads it and commits.
        await flush_functions(redis_url)
        assert (await store.commit("r1", 70, TokenUsage(), NOW + 1)).status == "committed"
        assert await libraries(client) == [name]
        (state,) = await store.bucket_states([daily("alice")], NOW + 1)
        assert (state.spent, state.reserved) == (70, 0)
    finally:
        await store.close()
        await client.aclose()


async def test_every_shard_of_a_cluster_gets_the_library_back_and_fcall_needs_no_key_lookup(
    redis_cluster: LocalCluster,
) -> None:
    await flush_redis(redis_cluster.url)
    await flush_functions(redis_cluster.url)
    store = RedisStore(redis_cluster.url, prefix="fn:")
    nodes = [Redis.from_url(u, decode_responses=True) for u in redis_cluster.node_urls()]
    try:
        primaries = [n for n in nodes if (await n.role())[0] == "master"]
        for node in primaries:
            await node.config_resetstat()
        # (Names whose hash slots fall on every shard of three.)
        users = [f"caller-{n}" for n in range(60)]
        ids = {}
        for user in users:
            ids[user] = store.mint_request_id([daily(user)])
            assert (await store.reserve(request(ids[user], user))).admitted
        for user in users:
            result = await store.commit(ids[user], 10, TokenUsage(), NOW + 1)
            assert result.status == "committed"
        states = await store.bucket_states([daily(u) for u in users], NOW + 1)
        assert {(s.spent, s.reserved) for s in states} == {(10, 0)}
        # Sixty users spread over every shard: each primary loaded the library itself.
        assert len(primaries) == 3
        names = {tuple(await libraries(node)) for node in primaries}
        assert len(names) == 1 and len(next(iter(names))) == 1
        for node in primaries:
            stats = await node.info("commandstats")
            assert stats["cmdstat_fcall"]["calls"] > 0
            assert "cmdstat_command|getkeys" not in stats
    finally:
        await store.close()
        for node in nodes:
            await node.aclose()


def test_libraries_of_different_code_or_topology_have_different_names() -> None:
    one = Library("-- lib", {"reserve": "return 1"}, cluster=False)
    assert one.function("reserve").startswith(one.name)
    others = [
        Library("-- lib", {"reserve": "return 2"}, cluster=False),
        Library("-- lib 2", {"reserve": "return 1"}, cluster=False),
        Library("-- lib", {"reserve": "return 1"}, cluster=True),
    ]
    assert len({one.name, *(other.name for other in others)}) == 4
    assert Library("-- lib", {"reserve": "return 1"}, cluster=False).name == one.name
    assert "allow-cross-slot-keys" in others[2].source
    assert "allow-cross-slot-keys" not in one.source
