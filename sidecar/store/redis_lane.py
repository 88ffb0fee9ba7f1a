"""Script calls to one Redis over connections of their own: packed in C, one timeout each.

A reserve is one EVALSHA of about a hundred arguments, and redis-py's general command path
cost ~120 µs of event-loop CPU for it against ~35 µs for the bytes and the round trip
themselves: the arguments encoded and packed in Python (~60 µs), a Task per write for its
timeout, pool bookkeeping and observability hooks on every call. Here a call is packed by
hiredis (a dependency already, for replies) and runs on a redis-py `Connection` made like
the client's own, under one `asyncio.timeout` covering the write and the read.

What the client's path guarantees is kept: a connection whose reply was not read whole
(timeout, dropped connection, the caller cancelled) is disconnected and never reused, so a
later call can never read an earlier call's reply; connection errors and timeouts are
retried once, on a fresh connection, as the client's own `Retry` would (a script that did
run before its reply was lost is safe to repeat: reserve and commit are idempotent per
request id); errors surface as redis-py's exceptions, which the store already maps.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Idle connections kept for reuse: as many as calls ever ran at once, up to this many.
_MAX_IDLE = 64


class ScriptLane:
    """EVALSHA and EVAL on one Redis (the `_Evaluator` a `LuaScript` runs on)."""

    def __init__(self, client: aioredis.Redis, timeout: float, retry: AsyncRetry) -> None:
        pool = client.connection_pool
        self._connection_class = pool.connection_class
        # The client's own settings (address, TLS, credentials, connect timeout, health
        # checks); the per-operation socket timeout is this lane's `timeout` instead.
        # No PING before a call on a connection idle for a while (the client's health
        # check): a connection that died while idle fails its call, which is retried once
        # on a fresh one (`_run`), and the check cost every call a coroutine and a clock
        # read.
        self._kwargs = {
            **pool.connection_kwargs,
            "socket_timeout": None,
            "health_check_interval": 0,
        }
        if "orig_socket_timeout" in self._kwargs:
            self._kwargs["orig_socket_timeout"] = None
        self._timeout = timeout
        self._retry = retry
        self._idle: list[AbstractConnection] = []
        self._closed = False

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._run(hiredis.pack_command(("EVALSHA", sha, numkeys, *keys_and_args)))

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._run(hiredis.pack_command(("EVAL", script, numkeys, *keys_and_args)))

    async def fcall(self, function: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._run(hiredis.pack_command(("FCALL", function, numkeys, *keys_and_args)))

    async def load_library(self, source: str, _key: str) -> None:
        command: Any = ("FUNCTION", "LOAD", "REPLACE", source)
        await self._run(hiredis.pack_command(command))

    async def aclose(self) -> None:
        self._closed = True  # calls still running close their connection when they end
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.disconnect()

    async def _run(self, packed: bytes) -> Any:
        tries = 0

        def attempt() -> Any:
            # A retry takes a new connection: the idle ones may have been dropped by the
            # same cause (a restarted Redis) without knowing it yet.
            nonlocal tries
            tries += 1
            return self._once(packed, fresh=tries > 1)

        return await self._retry.call_with_retry(attempt, _nothing)

    async def _once(self, packed: bytes, fresh: bool) -> Any:
        if self._idle and not fresh:
            connection = self._idle.pop()
        else:
            connection = self._connection_class(**self._kwargs)
        try:
            async with asyncio.timeout(self._timeout):
                await connection.send_packed_command(packed, check_health=False)
                reply = await connection.read_response()
        except ResponseError:
            # An error reply (a script error, NOSCRIPT) was read whole: the connection is
            # in step and can serve the next call.
            await self._keep(connection)
            raise
        except TimeoutError as exc:
            await connection.disconnect(nowait=True)
            raise RedisTimeoutError(f"Timeout running a script after {self._timeout}s") from exc
        except BaseException:
            # The reply may still be on its way: never read it as another call's.
            await connection.disconnect(nowait=True)
            raise
        await self._keep(connection)
        return reply

    async def _keep(self, connection: AbstractConnection) -> None:
        if len(self._idle) < _MAX_IDLE and not self._closed:
            self._idle.append(connection)
        else:
            await connection.disconnect(nowait=True)


async def _nothing(_error: Exception) -> None:
    # The failed connection was disconnected where it failed; the retry takes another.
    return None
