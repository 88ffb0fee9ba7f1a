"""Open-loop arrivals of streamed LLM calls: request i starts at `i / rate` whatever happened
before, and is read to its end. Runs as its own process (its event loop shares nothing with
the server's), and prints one JSON object: how many were served (200 with the whole stream),
refused with a retryable 503 (Retry-After and the JSON envelope), or neither.

    python -m bench.stream_load --url http://127.0.0.1:10000/openai/v1/chat/completions \
        --rate 100 --seconds 10 --body-file body.json --token-file tokens.txt

The client is plain asyncio protocols over raw HTTP/1.1 (uvloop when installed): every
request is prebuilt bytes, a response is only scanned for its status, headers and end, and
connections are kept alive and reused. An HTTP client library costs about ten times as much
CPU per stream, and on a 2-core machine shared with the server it, not the server, set the
highest rate that could be offered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

# A response not finished by then is counted as a hang.
TIMEOUT = 60.0


def _is_envelope(data: bytes) -> bool:
    try:
        answer = json.loads(data)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("success") is False


def _dechunk(body: bytes) -> bytes:
    out: list[bytes] = []
    pos = 0
    while True:
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            return b"".join(out)
        size = int(body[pos:line_end].split(b";")[0] or b"0", 16)
        if size == 0:
            return b"".join(out)
        out.append(body[line_end + 2 : line_end + 2 + size])
        pos = line_end + 2 + size + 2


class _Exchange(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, pool: list[_Exchange]) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[tuple[int, dict[bytes, bytes], bytes]] | None = None
        self._buf = bytearray()
        self._head: tuple[int, dict[bytes, bytes], int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self in self._pool:
            self._pool.remove(self)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed"))

    def send(self, request: bytes) -> asyncio.Future[tuple[int, dict[bytes, bytes], bytes]]:
        assert self.transport is not None
        self._buf.clear()
        self._head = None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self._buf[:end]).split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            self._head = (status, headers, end + 4)
        status, headers, start = self._head
        length = headers.get(b"content-length")
        if length is not None:
            if len(self._buf) - start < int(length):
                return
            body = bytes(self._buf[start : start + int(length)])
        elif self._buf.endswith(b"0\r\n\r\n") and (
            len(self._buf) - start == 5 or self._buf.endswith(b"\r\n0\r\n\r\n")
        ):
            body = _dechunk(bytes(self._buf[start:]))
        else:
            return
        waiter, self._waiter = self._waiter, None
        if headers.get(b"connection", b"").lower() == b"close":
            assert self.transport is not None
            self.transport.close()
        else:
            self._pool.append(self)
        if waiter is not None and not waiter.done():
            waiter.set_result((status, headers, body))


# A few answers that were neither served nor a proper refusal, to show what they were.
SAMPLES: list[dict[str, object]] = []
# Milliseconds from sending a request to its refusal (a prompt 503 vs one after a timeout).
REFUSED_MS: list[int] = []


async def _one(host: str, port: int, pool: list[_Exchange], request: bytes) -> str:
    loop = asyncio.get_running_loop()
    try:
        while pool and pool[-1].closed:
            pool.pop()
        if pool:
            conn = pool.pop()
        else:
            _, conn = await loop.create_connection(lambda: _Exchange(pool), host, port)
        sent = loop.time()
        status, headers, body = await asyncio.wait_for(conn.send(request), TIMEOUT)
    except TimeoutError:
        return "hang"
    except OSError:
        return "error"
    if status == 200:
        return "served" if body.rstrip().endswith(b"[DONE]") else "cut"
    if status == 503 and headers.get(b"retry-after") and _is_envelope(body):
        REFUSED_MS.append(round((loop.time() - sent) * 1000))
        return "refused"
    if len(SAMPLES) < 5:
        SAMPLES.append(
            {
                "status": status,
                "headers": {k.decode(): v.decode() for k, v in headers.items()},
                "body": body[:300].decode("utf-8", "replace"),
            }
        )
    return f"status_{status}"


def build_requests(
    url: str,
    body: bytes,
    tokens: list[str],
    extra: dict[str, str],
    token_header: str = "authorization",
) -> list[bytes]:
    parts = urlsplit(url)
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in extra.items())
    )
    prefix = "Bearer " if token_header == "authorization" else ""
    return [(head + f"{token_header}: {prefix}{token}\r\n\r\n").encode() + body for token in tokens]


async def run(
    url: str,
    rate: float,
    seconds: float,
    body: bytes,
    tokens: list[str],
    extra: dict[str, str],
    token_header: str = "authorization",
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = build_requests(url, body, tokens, extra, token_header)
    pool: list[_Exchange] = []
    outcomes: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    total = int(rate * seconds)
    for i in range(total):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(_one(host, port, pool, requests[i % len(requests)])))
    sent_for = loop.time() - start
    for outcome in await asyncio.gather(*tasks):
        outcomes[outcome] += 1
    took = loop.time() - start
    for conn in pool:
        if conn.transport is not None:
            conn.transport.close()
    return {
        "offered": total,
        "offered_rate": rate,
        "seconds": seconds,
        "send_seconds": round(sent_for, 3),
        "total_seconds": round(took, 3),
        "outcomes": dict(outcomes),
        "odd_samples": SAMPLES,
        "refused_ms": sorted(REFUSED_MS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--body-file", type=Path, required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument(
        "--token-header",
        default="authorization",
        help="header that carries each token (a Bearer token in authorization)",
    )
    args = parser.parse_args()
    extra = dict(h.split(": ", 1) for h in args.header)
    tokens = args.token_file.read_text().split()
    started = time.time()
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    result = runner(
        run(
            args.url,
            args.rate,
            args.seconds,
            args.body_file.read_bytes(),
            tokens,
            extra,
            args.token_header,
        )
    )
    result["started"] = started
    print(json.dumps(result))


if __name__ == "__main__":
    main()
