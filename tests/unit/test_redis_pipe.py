"""The script lane's connection protocol (sidecar.store.redis_lane._Pipe) fed bytes by hand:
replies split anywhere are matched to calls in order, a RESP3 push is no call's reply, and
a connection that is out of step (a reply nobody asked for, bytes that are not RESP) is
closed with every call failed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError

from sidecar.store.redis_lane import _Pipe


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False
        self.protocol: Any = None

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True


def pipe() -> tuple[_Pipe, FakeTransport]:
    transport = FakeTransport()
    encoder = SimpleNamespace(decode_responses=True, encoding="utf-8", encoding_errors="strict")
    connection: Any = SimpleNamespace(
        _writer=SimpleNamespace(transport=transport), _reader=object(), encoder=encoder
    )
    made = _Pipe(connection, timeout=5.0)
    assert transport.protocol is made
    return made, transport


async def test_replies_split_anywhere_go_to_their_calls_in_order() -> None:
    p, transport = pipe()
    first, second, third = p.call(b"a"), p.call(b"b"), p.call(b"c")
    assert transport.written == [b"a", b"b", b"c"]
    stream = b"$5\r\nfirst\r\n-ERR second failed\r\n*2\r\n:3\r\n$1\r\nx\r\n"
    for i in range(0, len(stream), 3):
        p.data_received(stream[i : i + 3])
    assert first.result() == "first"
    assert isinstance(second.exception(), ResponseError)
    assert str(second.exception()) == "second failed"
    assert third.result() == [3, "x"]
    assert not p.broken


async def test_a_reply_for_a_call_whose_caller_left_is_dropped() -> None:
    p, _ = pipe()
    gone, mine = p.call(b"a"), p.call(b"b")
    gone.cancel()
    p.data_received(b"+theirs\r\n+mine\r\n")
    assert mine.result() == "mine"


async def test_a_resp3_push_takes_no_calls_place() -> None:
    p, _ = pipe()
    mine = p.call(b"a")
    p.data_received(b">2\r\n$7\r\nmessage\r\n$1\r\nx\r\n+mine\r\n")
    assert mine.result() == "mine"
    assert not p.broken


async def test_a_reply_nobody_asked_for_closes_the_connection() -> None:
    p, transport = pipe()
    p.data_received(b"+surprise\r\n")
    assert p.broken and transport.aborted
    with pytest.raises(RedisConnectionError):
        p.call(b"x").result()  # fails at once: nothing is sent on a closed connection


async def test_bytes_that_are_not_resp_fail_every_waiting_call() -> None:
    p, transport = pipe()
    calls = [p.call(b"a"), p.call(b"b")]
    p.data_received(b"?junk\r\n")
    assert p.broken and transport.aborted
    assert all(isinstance(c.exception(), InvalidResponse) for c in calls)


async def test_a_lost_connection_fails_every_waiting_call() -> None:
    p, _ = pipe()
    calls = [p.call(b"a"), p.call(b"b")]
    p.connection_lost(None)
    assert all(isinstance(c.exception(), RedisConnectionError) for c in calls)
