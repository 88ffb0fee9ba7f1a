"""A streaming upstream for the benchmark: an OpenAI chat completion stream of N chunks.

Plain asyncio (no web framework; uvloop when installed), so the upstream costs the same
small amount for every row and is never what a row measures. The chunk count comes from the
request's `x-bench-chunks` header (default 16); chunks are written `--gap-ms` apart (default
1), so Envoy reads them as separate body chunks as it would a model's tokens, then the usage chunk
and `[DONE]`. Every stream reports the same usage: 12 prompt tokens and one completion
token per chunk.

    python -m bench.sse_upstream --port 9102 [--gap-ms 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from devtools.procs import ManagedProcess

PROMPT_TOKENS = 12


def _event(data: dict[str, object]) -> bytes:
    frame = b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(frame), frame)


def _chunk(content: str) -> bytes:
    return _event(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": content}}],
        }
    )


TOKEN = _chunk("tok ")
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
DONE = b"%x\r\n%s\r\n0\r\n\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n")


def usage_chunk(chunks: int) -> bytes:
    return _event(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini",
            "choices": [],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": chunks,
                "total_tokens": PROMPT_TOKENS + chunks,
            },
        }
    )


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gap: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            if length:
                await reader.readexactly(length)
            chunks = int(headers.get(b"x-bench-chunks", b"16"))
            writer.write(HEAD)
            for _ in range(chunks):
                writer.write(TOKEN)
                await writer.drain()
                await asyncio.sleep(gap)
            writer.write(usage_chunk(chunks) + DONE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(port: int, gap: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, gap), "127.0.0.1", port, reuse_port=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def start(stack: ExitStack, workdir: Path) -> tuple[ManagedProcess, int]:
    """This upstream as a process of its own on a free port, stopped with `stack`."""
    from devtools.procs import LOOPBACK, ManagedProcess, free_port, wait_for_port

    port = free_port()
    argv = [sys.executable, "-m", "bench.sse_upstream", "--port", str(port)]
    process = stack.enter_context(ManagedProcess("upstream", argv, workdir).start())
    wait_for_port(LOOPBACK, port, 20, process=process)
    return process, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gap-ms", type=float, default=1.0)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, args.gap_ms / 1000))
    else:
        uvloop.run(serve(args.port, args.gap_ms / 1000))


if __name__ == "__main__":
    main()
