"""The script lane (sidecar.store.redis_lane) on a real redis-server: calls at once share one
connection and each gets its own reply, a reply nobody read is never taken for the next
call's, an error reply leaves the connection in step, a connection Redis dropped is
replaced, and a reserve whose record the store renders by hand reads back as the script
stored it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
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


def lane(client: aioredis.Redis, timeout: float, retries: int = 1) -> ScriptLane:
    return ScriptLane(client, timeout, AsyncRetry(NoBackoff(), retries=retries))


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


async def test_calls_at_once_share_one_connection_and_each_gets_its_own_reply(
    client: aioredis.Redis,
) -> None:
    scripts = lane(client, timeout=5.0)
    try:
        # Some slow, some fast, some failing: replies come back in the order sent.
        calls = [
            scripts.eval(BUSY, 0, 2_000, f"slow {i}")
            if i % 7 == 0
            else scripts.eval("return redis.error_reply('ERR no ' .. ARGV[1])", 0, str(i))
            if i % 5 == 0
            else scripts.eval("return ARGV[1]", 0, str(i))
            for i in range(300)
        ]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        for i, reply in enumerate(replies):
            if i % 7 == 0:
                assert reply == f"slow {i}"
            elif i % 5 == 0:
                assert isinstance(reply, ResponseError) and str(reply) == f"no {i}"
            else:
                assert reply == str(i)
        clients = await client.client_list(_type="normal")
        assert len(clients) == 2  # this test's own client and the lane's one connection
    finally:
        await scripts.aclose()


async def test_an_error_reply_is_redis_pys_exception_and_leaves_the_connection_in_step(
    client: aioredis.Redis,
) -> None:
    scripts = lane(client, timeout=5.0)
    try:
        with pytest.raises(NoScriptError):
            await scripts.evalsha("0" * 40, 0)
        assert await scripts.eval("return ARGV[1]", 0, "next") == "next"
        assert len(await client.client_list(_type="normal")) == 2
    finally:
        await scripts.aclose()


async def test_calls_sent_behind_a_timed_out_call_fail_and_never_see_its_reply(
    client: aioredis.Redis,
) -> None:
    scripts = lane(client, timeout=0.3, retries=0)
    try:
        slow = asyncio.ensure_future(scripts.eval(BUSY, 0, 400_000, "late"))
        await asyncio.sleep(0)  # sent first
        behind = [scripts.eval("return ARGV[1]", 0, str(i)) for i in range(3)]
        replies = await asyncio.gather(slow, *behind, return_exceptions=True)
        assert isinstance(replies[0], RedisTimeoutError)
        # Redis had not answered them either; their connection is closed with it.
        assert all(isinstance(r, RedisConnectionError) for r in replies[1:])
        assert await client.ping()  # the script ran; its reply went to a closed connection
        assert await scripts.eval("return ARGV[1]", 0, "mine") == "mine"
    finally:
        await scripts.aclose()


async def test_connections_redis_dropped_are_replaced(client: aioredis.Redis) -> None:
    scripts = lane(client, timeout=2.0)
    try:
        calls = [scripts.eval("return ARGV[1]", 0, str(i)) for i in range(5)]
        assert await asyncio.gather(*calls) == [str(i) for i in range(5)]
        # Redis restarted, or closed idle clients: the lane's connection is dead.
        assert await client.client_kill_filter(_type="normal", skipme=True) == 1
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
