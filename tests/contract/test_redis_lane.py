"""The script lane (sidecar.store.redis_lane) on a real redis-server: a reply nobody read is
never taken for the next call's, a connection Redis dropped is replaced, and a reserve whose
record the store renders by hand reads back as the script stored it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.model import TokenUsage
from sidecar.store.budget_types import BucketView
from sidecar.store.redis_lane import ScriptLane
from sidecar.store.redis_store import RedisStore
from tests.support.redis_admin import flush_redis
from tests.support.reserve import reserve_request

NOW = 1_800_000_000.0
DAY = 1_799_971_200
TTL = 90_000

# Keeps Redis busy for ARGV[1] microseconds, then answers ARGV[2].
BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start >= tonumber(ARGV[1])
return ARGV[2]
"""


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield r
    finally:
        await r.aclose()


def lane(client: aioredis.Redis, timeout: float) -> ScriptLane:
    return ScriptLane(client, timeout, AsyncRetry(NoBackoff(), retries=1))


async def test_a_timed_out_call_leaves_no_reply_for_the_next_call(
    client: aioredis.Redis,
) -> None:
    scripts = lane(client, timeout=0.1)
    try:
        with pytest.raises(RedisTimeoutError):
            await scripts.eval(BUSY, 0, 600_000, "late")
        # Redis answers once both attempts' scripts ran: their "late" replies were sent
        # after the lane gave up on them, and neither may be read as the next call's.
        assert await client.ping()
        assert await scripts.eval("return ARGV[1]", 0, "mine") == "mine"
        assert await scripts.eval("return ARGV[1]", 0, "mine too") == "mine too"
    finally:
        await scripts.aclose()


async def test_a_cancelled_call_leaves_no_reply_for_the_next_call(
    client: aioredis.Redis,
) -> None:
    scripts = lane(client, timeout=5.0)
    try:
        with pytest.raises(TimeoutError):
            # The caller gives up (its deadline, or its own caller cancelled it).
            await asyncio.wait_for(scripts.eval(BUSY, 0, 600_000, "late"), 0.1)
        assert await client.ping()  # the script ran and its reply was sent
        assert await scripts.eval("return ARGV[1]", 0, "mine") == "mine"
    finally:
        await scripts.aclose()


async def test_connections_redis_dropped_are_replaced(client: aioredis.Redis) -> None:
    scripts = lane(client, timeout=2.0)
    try:
        calls = [scripts.eval("return ARGV[1]", 0, str(i)) for i in range(5)]
        assert await asyncio.gather(*calls) == [str(i) for i in range(5)]
        # Redis restarted, or closed idle clients: every kept connection is dead.
        assert await client.client_kill_filter(_type="normal", skipme=True) >= 5
        assert await scripts.eval("return ARGV[1]", 0, "again") == "again"
    finally:
        await scripts.aclose()


async def test_scripts_redis_forgot_run_again_on_the_lane(redis_url: str) -> None:
    st = RedisStore(redis_url)
    try:
        await flush_redis(redis_url)
        view = BucketView(key="b:lane", slot=DAY, since=DAY, ttl_seconds=90_000, limit=100)
        assert (await st.reserve(reserve_request("r1", 10, view, now=NOW))).admitted
        assert st._lane is not None
        await st._r.script_flush()
        assert (await st.commit("r1", 4, TokenUsage(), NOW)).status == "committed"
    finally:
        await st.close()


async def test_a_record_with_awkward_bucket_names_reads_back(redis_url: str) -> None:
    st = RedisStore(redis_url)
    try:
        await flush_redis(redis_url)
        # Quotes, backslashes, non-ASCII, a rolling window (slots in a hash): the record's
        # JSON is rendered by the store, and the scripts read names back from it.
        views = [
            BucketView('per-user|user=a"b\\c', slot=DAY, since=DAY, ttl_seconds=TTL, limit=100),
            BucketView("per-user|user=zoë", slot=DAY, since=DAY - 60, ttl_seconds=TTL, limit=100),
        ]
        assert (await st.reserve(reserve_request("r1", 30, *views, now=NOW))).admitted
        assert [s.reserved for s in await st.bucket_states(views, NOW)] == [30, 30]
        assert (await st.commit("r1", 7, TokenUsage(), NOW)).status == "committed"
        states = await st.bucket_states(views, NOW)
        assert [(s.spent, s.reserved) for s in states] == [(7, 0), (7, 0)]
    finally:
        await st.close()
