"""Latency at a fixed offered rate: an open-loop HTTP/1.1 client on raw asyncio sockets.

wrk2 is not packaged by Debian and wrk is closed loop: a slow answer delays the next
request on its connection, so the slow moments are sampled less (coordinated omission).
Here request i is due at `start + i / rate` whatever happened before, goes out on any idle
keep-alive connection (a new one is opened when none is idle), and its latency is measured
from when it was due, not from when it could be sent. A stalled server therefore shows up
in the tail as it would to real clients arriving at that rate.

Runs as its own process so its event loop shares no interpreter with the orchestrator:

    python -m bench.open_loop --url http://127.0.0.1:10000/openai/v1/chat/completions \
        --rate 500 --seconds 10 --body-file body.json --header 'cf-access-jwt-assertion: ...'

Prints one JSON object: counts, percentiles in ms, and every latency (for pooling runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

_MAX_CONNECTIONS = 512
_REQUEST_TIMEOUT = 5.0


@dataclass
class _Pending:
    due: float
    future: asyncio.Future[int]


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, client: OpenLoopClient) -> None:
        self._client = client
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._need = -1
        self._status = 0
        self._close = False
        self.pending: _Pending | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, pending: _Pending, request: bytes) -> None:
        assert self.transport is not None
        self.pending = pending
        self._buf.clear()
        self._need = -1
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._need < 0:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).lower()
            self._status = int(head[9:12])
            self._close = b"\r\nconnection: close" in head
            length = 0
            marker = head.find(b"\r\ncontent-length:")
            if marker >= 0:
                stop = head.find(b"\r\n", marker + 2)
                length = int(head[marker + 17 : stop if stop >= 0 else len(head)])
            self._need = end + 4 + length
        if len(self._buf) >= self._need and self.pending is not None:
            pending, self.pending = self.pending, None
            if not pending.future.done():
                pending.future.set_result(self._status)
            if self._close:
                # The server is closing it: reusing it would fail the next request.
                assert self.transport is not None
                self.transport.close()
            else:
                self._client.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.closed(self)
        if self.pending is not None and not self.pending.future.done():
            self.pending.future.set_exception(ConnectionError("connection closed"))


@dataclass
class OpenLoopClient:
    host: str
    port: int
    request: bytes
    idle: list[_Connection] = field(default_factory=list)
    connections: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0

    def closed(self, conn: _Connection) -> None:
        self.connections -= 1
        if conn in self.idle:
            self.idle.remove(conn)

    async def _one(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        pending = _Pending(due, loop.create_future())
        try:
            if self.idle:
                conn = self.idle.pop()
            else:
                if self.connections >= _MAX_CONNECTIONS:
                    raise ConnectionError("connection limit reached")
                self.connections += 1
                try:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self), self.host, self.port
                    )
                except BaseException:
                    self.connections -= 1
                    raise
            conn.send(pending, self.request)
            status = await asyncio.wait_for(pending.future, _REQUEST_TIMEOUT)
        except (OSError, TimeoutError, ValueError):
            self.errors += 1
            return
        self.latencies_ms.append((loop.time() - due) * 1000)
        self.statuses[status] = self.statuses.get(status, 0) + 1

    async def run(self, rate: float, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        total = int(rate * seconds)
        tasks: set[asyncio.Task[None]] = set()
        start = loop.time() + 0.05
        sent = 0
        while sent < total:
            now = loop.time()
            # Everything already due goes out now: a late wake-up must not lower the rate.
            while sent < total and start + sent / rate <= now:
                task = loop.create_task(self._one(start + sent / rate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            if sent < total:
                await asyncio.sleep(max(0.0, start + sent / rate - loop.time()))
        if tasks:
            await asyncio.wait(tasks, timeout=_REQUEST_TIMEOUT + 1)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def build_request(url: str, method: str, body: bytes, headers: dict[str, str]) -> bytes:
    parts = urlsplit(url)
    path = parts.path or "/"
    lines = [f"{method} {path} HTTP/1.1", f"host: {parts.netloc}", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--method", default="POST")
    parser.add_argument("--body-file", type=Path)
    parser.add_argument("--header", action="append", default=[], help="'name: value'")
    args = parser.parse_args(argv)
    body = args.body_file.read_bytes() if args.body_file else b""
    headers = dict(h.split(": ", 1) for h in args.header)
    parts = urlsplit(args.url)
    client = OpenLoopClient(
        parts.hostname or "127.0.0.1",
        parts.port or 80,
        build_request(args.url, args.method, body, headers),
    )
    asyncio.run(client.run(args.rate, args.seconds))
    lat = client.latencies_ms
    json.dump(
        {
            "offered_rps": args.rate,
            "seconds": args.seconds,
            "completed": len(lat),
            "errors": client.errors,
            "statuses": {str(k): v for k, v in client.statuses.items()},
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
            "max_ms": max(lat) if lat else float("nan"),
            "latencies_ms": [round(x, 4) for x in lat],
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
