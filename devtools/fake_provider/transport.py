"""How answers leave: echoed headers, `x-fake-delay-ms` pacing, `x-fake-gzip`, and recorded
responses replayed byte for byte (`x-fake-replay`, `x-fake-chunk-bytes`)."""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from devtools.fake_provider.errors import error_body
from sidecar.metering.parse import Api

ECHOED_HEADER_PREFIXES = ("x-sidecar-", "x-request-id")
_REPLAY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.(json|sse)")


def joined_headers(request: Request) -> dict[str, str]:
    joined: dict[str, str] = {}
    for name, value in request.headers.items():
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    return joined


def echo(request: Request) -> dict[str, str]:
    seen = {
        k: v for k, v in joined_headers(request).items() if k.startswith(ECHOED_HEADER_PREFIXES)
    }
    return {"x-fake-seen-headers": json.dumps(seen, sort_keys=True)}


def delay_seconds(request: Request) -> float:
    try:
        millis = float(request.headers.get("x-fake-delay-ms", "0"))
    except ValueError:
        return 0.0
    return min(max(millis, 0.0), 60_000.0) / 1000


def json_response(request: Request, payload: Mapping[str, Any], status: int = 200) -> Response:
    content = json.dumps(payload).encode()
    headers = echo(request)
    if request.headers.get("x-fake-gzip") == "1":
        content = _gzip(content)
        headers["content-encoding"] = "gzip"
    return Response(content, status, headers, media_type="application/json")


def _gzip(content: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=31)
    return compressor.compress(content) + compressor.flush()


async def paced(frames: Iterator[bytes], delay: float, gzip: bool) -> AsyncIterator[bytes]:
    compressor = zlib.compressobj(wbits=31) if gzip else None
    for index, frame in enumerate(frames):
        if index and delay:
            await asyncio.sleep(delay)
        if compressor is None:
            yield frame
        else:
            # A sync flush per frame lets the client decode each event as it arrives.
            yield compressor.compress(frame) + compressor.flush(zlib.Z_SYNC_FLUSH)
    if compressor is not None:
        yield compressor.flush()


def _pieces(content: bytes, size: int) -> Iterator[bytes]:
    if size <= 0:
        events = content.split(b"\n\n")
        yield from (event + b"\n\n" for event in events[:-1])
        if events[-1]:
            yield events[-1]
        return
    yield from (content[i : i + size] for i in range(0, len(content), size))


def replay(request: Request, api: Api, replay_dir: Path | None, name: str) -> Response:
    """A recorded response, byte for byte."""
    match = _REPLAY_NAME.fullmatch(name)
    path = replay_dir / name if replay_dir is not None and match else None
    if path is None or not path.is_file():
        message = f"no recorded response {name!r} (start with --replay-dir)"
        return json_response(request, error_body(api, 404, message), 404)
    content = path.read_bytes()
    if name.endswith(".json"):
        return Response(content, 200, echo(request), media_type="application/json")
    size_header = request.headers.get("x-fake-chunk-bytes", "0")
    size = int(size_header) if size_header.isdigit() else 0
    stream = paced(_pieces(content, size), delay_seconds(request), gzip=False)
    return StreamingResponse(stream, headers=echo(request), media_type="text/event-stream")
