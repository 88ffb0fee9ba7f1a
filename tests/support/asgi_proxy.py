"""A minimal LLM proxy written as a Starlette app, and a uvicorn server in a thread to run it.

The proxy forwards `/openai/...` to an upstream (the fake provider) and streams the answer
back chunk by chunk, as a real Python gateway would; SidecarMiddleware goes around it and
hands it the provider key in `authorization`, which it passes on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from devtools.procs import LOOPBACK, free_port
from sidecar.asgi import ASGIApp


def proxy_app(upstream: str) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream, timeout=60)
    seen: list[dict[str, str]] = []

    async def forward(request: Request) -> Response:
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.startswith(("x-sidecar-", "x-fake-", "x-request-id"))
            or k in ("content-type", "authorization")
        }
        seen.append(dict(request.headers))
        upstream_request = client.build_request(
            request.method,
            "/openai/" + request.path_params["path"],
            headers=headers,
            content=await request.body(),
        )
        response = await client.send(upstream_request, stream=True)
        passed = {
            k: v for k, v in response.headers.items() if k in ("content-type", "content-encoding")
        }
        return StreamingResponse(
            response.aiter_raw(),
            status_code=response.status_code,
            headers=passed,
            background=BackgroundTask(response.aclose),
        )

    async def seen_headers(request: Request) -> Response:
        return JSONResponse(seen)

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/openai/{path:path}", forward, methods=["GET", "POST"]),
            Route("/_proxy_seen", seen_headers),
            Route("/healthz", health),
        ]
    )


@contextmanager
def serve(app: ASGIApp, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` under uvicorn (lifespan on) in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host=LOOPBACK, port=port, lifespan="on", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
