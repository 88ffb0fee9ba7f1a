"""Script calls to one Redis, pipelined on one connection: packed in C, replies matched to
calls in the order Redis answers them.

A reserve is one FCALL of about a hundred arguments. redis-py's general command path cost
~120 µs of event-loop CPU for it against ~35 µs for the bytes and the round trip
themselves. A lane of connections of its own, one call at a time on each, each call under
an `asyncio.timeout`, still spent ~36 µs a call in redis-py's send and read paths and its
timeout. Here every call is one `transport.write` of bytes hiredis packed, and the
connection's replies reach a protocol of the lane's own, which parses them with hiredis
and hands each to the call it answers. Calls made while others wait share the connection:
Redis runs commands one at a time anyway, and reads them, and the sidecar their replies,
several to a system call under load.

What one call per connection guaranteed is kept:

- A reply is only ever read as the reply of the call it answers: Redis answers a
  connection's commands in order, so replies are matched first in, first out. A call whose
  caller went away (cancelled) keeps its place; its reply is read and dropped.
- A call not answered within `timeout` of being sent breaks the connection: it and every
  call behind it (Redis has not answered those either) fail, the connection is closed, and
  the next call opens another. A late reply can therefore never be taken for a later
  call's.
- Connection errors and timeouts are retried once, on a connection opened after the
  failure, as the client's own `Retry` would (a script that did run before its reply was
  lost is safe to repeat: reserve and commit are idempotent per request id).
- Errors surface as redis-py's exceptions (error replies parsed by redis-py's own parser
  rules), which the store already maps.

The connection is made and set up (TLS, AUTH, SELECT, client name) by a redis-py
`Connection` with the client's own settings; once set up, its transport is handed to the
lane's protocol.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis._parsers import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

_PUSH: Any = getattr(hiredis, "PushNotification", None)


class _Pipe(asyncio.Protocol):
    """One set-up connection carrying calls; replies matched to calls in order."""

    def __init__(self, connection: AbstractConnection, timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        writer = connection._writer
        assert writer is not None, "the connection is set up"
        self._transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        encoder = connection.encoder
        # Replies decoded as the client's own (its `decode_responses`), errors made the
        # exceptions redis-py's parsers make.
        decoding = (
            {"encoding": encoder.encoding, "errors": encoder.encoding_errors}
            if encoder.decode_responses
            else {}
        )
        self._replies = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error, **decoding
        )
        # (the call's future, when it stops waiting), in the order the calls were sent.
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.broken = False
        self._transport.set_protocol(self)

    def call(self, packed: bytes) -> asyncio.Future[Any]:
        loop = self._loop
        done: asyncio.Future[Any] = loop.create_future()
        if self.broken:  # the lane hands out none, but a call on one must never hang
            done.set_exception(RedisConnectionError("the connection to Redis is closed"))
            return done
        deadline = loop.time() + self._timeout
        self._waiting.append((done, deadline))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._on_timer)
        self._transport.write(packed)
        return done

    # -- asyncio.Protocol ---------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        replies = self._replies
        replies.feed(data)
        waiting = self._waiting
        while True:
            try:
                reply = replies.gets()
            except InvalidResponse as exc:
                self.close(exc)
                return
            if reply is False:
                return
            if type(reply) is _PUSH:
                # RESP3 out-of-band data (a client-side caching invalidation, say), never a
                # command's reply: it takes no call's place.
                continue
            if not waiting:
                # Nothing asked for it: the connection is out of step; never guess.
                self.close(InvalidResponse("Redis sent a reply no call is waiting for"))
                return
            done = waiting.popleft()[0]
            if done.done():  # its caller went away: read and dropped
                continue
            if isinstance(reply, Exception):
                done.set_exception(reply)
            else:
                done.set_result(reply)

    def eof_received(self) -> bool:
        self.close(RedisConnectionError("Redis closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(RedisConnectionError(f"the connection to Redis was lost: {exc or 'closed'}"))

    # -- failure ------------------------------------------------------------------------
    def _on_timer(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        deadline = self._waiting[0][1]
        if deadline <= self._loop.time():
            self.close(None)
        else:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def close(self, error: Exception | None) -> None:
        """Stop using the connection; every call still waiting fails with `error` (None: the
        first timed out, those behind it lost their connection)."""
        if self.broken:
            return
        self.broken = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, deque()
        for index, (done, _) in enumerate(waiting):
            if done.done():
                continue
            if error is not None:
                done.set_exception(error)
            elif index == 0:
                done.set_exception(
                    RedisTimeoutError(f"Timeout running a script after {self._timeout}s")
                )
            else:
                done.set_exception(
                    RedisConnectionError("dropped: a script sent before it timed out")
                )
        # Nothing more is read from it: a reply on its way can never meet another call.
        self._transport.abort()
        self._connection._writer = self._connection._reader = None


class ScriptLane:
    """EVALSHA, EVAL and FCALL on one Redis (the `_Evaluator` a `LuaScript` runs on)."""

    def __init__(self, client: aioredis.Redis, timeout: float, retry: AsyncRetry) -> None:
        pool = client.connection_pool
        self._connection_class = pool.connection_class
        # The client's own settings (address, TLS, credentials, connect timeout); the lane
        # times calls itself, and a dead connection is known when Redis closes it (no PING
        # before calls: it cost every call a coroutine and a clock read).
        self._kwargs = {
            **pool.connection_kwargs,
            "socket_timeout": None,
            "health_check_interval": 0,
        }
        if "orig_socket_timeout" in self._kwargs:
            self._kwargs["orig_socket_timeout"] = None
        self._timeout = timeout
        self._retry = retry
        self._pipe: _Pipe | None = None
        self._opening: asyncio.Task[_Pipe] | None = None
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
        self._closed = True
        if self._opening is not None:
            self._opening.cancel()
        if self._pipe is not None:
            self._pipe.close(RedisConnectionError("the store is closed"))
            self._pipe = None

    async def _run(self, packed: bytes) -> Any:
        # The client's retry policy (its backoff, one retry); a failed attempt's connection
        # is broken, so the retry runs on one opened after the failure.
        return await self._retry.call_with_retry(lambda: self._attempt(packed), _nothing)

    async def _attempt(self, packed: bytes) -> Any:
        pipe = self._pipe
        if pipe is None or pipe.broken:
            pipe = await self._open()
        return await pipe.call(packed)

    async def _open(self) -> _Pipe:
        if self._closed:
            raise RedisConnectionError("the store is closed")
        if self._opening is None:
            self._opening = asyncio.get_running_loop().create_task(self._connect())
            self._opening.add_done_callback(self._opened)
        # Shared by every call waiting for it: one caller going away does not stop it.
        return await asyncio.shield(self._opening)

    def _opened(self, task: asyncio.Task[_Pipe]) -> None:
        if self._opening is task:
            self._opening = None
        if not task.cancelled() and task.exception() is None:
            self._pipe = task.result()
            if self._closed:  # closed while it connected
                self._pipe.close(RedisConnectionError("the store is closed"))

    async def _connect(self) -> _Pipe:
        connection = self._connection_class(**self._kwargs)
        try:
            async with asyncio.timeout(self._timeout):
                await connection.connect()  # type: ignore[no-untyped-call]
        except TimeoutError as exc:
            await connection.disconnect(nowait=True)
            raise RedisTimeoutError(f"Timeout connecting to Redis after {self._timeout}s") from exc
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        return _Pipe(connection, self._timeout)


async def _nothing(_error: Exception) -> None:
    # The failed connection was closed where it failed; the retry opens another.
    return None
