"""ASGI middleware: the sidecar's decisions in-process, for LLM proxies written in Python.

    app = SidecarMiddleware(app, config_path="sidecar.yaml")

Wraps any ASGI app (Starlette, FastAPI, ...) with the same identity, allowlist, budget and
fallback decisions that Envoy gets from ext_authz, and the same metering as ext_proc:

- the request body is buffered (up to 1 MiB, as Envoy's `with_request_body`) so the model
  can be read, then replayed to the app; on a fallback its `model` is rewritten (and an
  OpenAI chat stream asks for usage, as ext_proc does), with `content-length` fixed;
- the identity headers (`x-sidecar-email`, `-groups`, `-kind`, ...) are set in the scope the
  app sees, and the caller's credential headers removed from it;
- the app's response streams through untouched: each body chunk is fed to a `UsageMeter`
  as it passes, and the actual cost is committed when the body ends (or what was observed,
  else the estimate, when the exchange is cut short).

Budgets live in the store named by the config (SQLite file or Redis), so an app using this
middleware and an Envoy-fronted sidecar on the same store share them. Services are built on
the lifespan startup (or on the first request for servers without lifespan) and closed on
shutdown; pass `services=` to share ones built elsewhere (their owner starts and closes them).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from sidecar.decisions import error_body
from sidecar.envoy.request_body import mutate
from sidecar.metering import load_json
from sidecar.metering.parse import Api, UsageMeter, api_for_path
from sidecar.model import Decision, RequestAttrs
from sidecar.services import Services, build_services

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = structlog.get_logger("sidecar.asgi")
MAX_BODY = 1024 * 1024
# Headers of the original request that no longer describe the replayed one.
_REPLACED = frozenset({"content-length", "transfer-encoding", "x-request-id"})


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body; None if the client left; ValueError past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ValueError(f"request body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, headers: Mapping[str, str], body: bytes) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if not any(k == b"content-length" for k, _ in raw):
        raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Exchange:
    """One admitted call: meters its response and charges it exactly once."""

    def __init__(self, services: Services, request_id: str, decision: Decision,
                 api: Api | None, body: bytes) -> None:
        self.services = services
        self.request_id = request_id
        self.model = decision.model
        self.provider = decision.provider
        self.api = api
        self.body = body
        self.meter: UsageMeter | None = None
        self.done = False

    def start(self, headers: Mapping[str, str]) -> None:
        if self.api is not None and self.model:
            self.meter = UsageMeter.for_response(self.api, headers.get("content-type", ""),
                                                 headers.get("content-encoding", ""))

    def feed(self, chunk: bytes) -> None:
        if self.meter is not None:
            self.meter.feed(chunk)

    async def finish(self, reason: str) -> None:
        if self.done or not self.model:
            return
        self.done = True
        usage = None
        if self.meter is not None:
            self.meter.finish()
            usage = self.meter.usage
        engine = self.services.engine
        try:
            if usage is not None:
                await engine.commit(self.request_id, self.model, self.provider, usage)
                return
            # Nothing observed (an error, an unparsed API, a stream cut before its usage):
            # never $0, so the estimate.
            log.warning("no_usage_observed", request_id=self.request_id, model=self.model,
                        reason=reason)
            parsed = load_json(self.body) if self.body else None
            await engine.commit_estimate(self.request_id, self.model, self.provider,
                                         parsed if isinstance(parsed, dict) else {})
        except Exception as exc:  # the response must flow even when the store is down
            # The reservation stays and is charged its estimate when it expires.
            log.error("commit_failed", request_id=self.request_id, error=str(exc))


class SidecarMiddleware:
    def __init__(self, app: ASGIApp, *, config_path: str | Path | None = None,
                 services: Services | None = None, exempt_paths: Sequence[str] = (),
                 max_body: int = MAX_BODY) -> None:
        if (config_path is None) == (services is None):
            raise TypeError("SidecarMiddleware needs exactly one of config_path or services")
        self.app = app
        self._config_path = Path(config_path) if config_path is not None else None
        self._services = services
        self._owns = services is None
        self._lock = asyncio.Lock()
        # Path prefixes the app serves without a decision (its health checks, say).
        self._exempt = tuple(exempt_paths)
        self._max_body = max_body
        # Commits finishing after their request was cancelled; held so they are not lost.
        self._finishing: set[asyncio.Task[None]] = set()

    async def services(self) -> Services:
        if self._services is None:
            async with self._lock:
                if self._services is None:
                    assert self._config_path is not None
                    services = await build_services(self._config_path)
                    services.start_background()
                    self._services = services
        return self._services

    async def close(self) -> None:
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)
        if self._owns and self._services is not None:
            services, self._services = self._services, None
            await services.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._lifespan_receive(receive), send)
        elif scope["type"] != "http" or (self._exempt and scope["path"].startswith(self._exempt)):
            await self.app(scope, receive, send)
        else:
            await self._http(scope, receive, send)

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.services()
            elif message["type"] == "lifespan.shutdown":
                await self.close()
            return message

        return wrapped

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = await self.services()
        headers = _headers(scope)
        # Always a fresh id: it keys the reservation, so a client must not choose it.
        request_id = uuid.uuid4().hex
        try:
            body = await _read_body(receive, self._max_body)
        except ValueError as exc:
            await _respond(send, 413, {"content-type": "application/json"},
                           error_body("request_too_large", str(exc)))
            return
        if body is None:
            return
        path = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        attrs = RequestAttrs(method=scope["method"], path=f"{path}?{query}" if query else path,
                             headers=headers, body=body or None, request_id=request_id)
        decision = await services.engine.check(attrs)
        if not decision.allowed:
            await _respond(send, decision.http_status, decision.headers, decision.body)
            return
        api = api_for_path(path)
        exchange = _Exchange(services, request_id, decision, api, body)
        if decision.model:
            fallback = decision.reason == "fallback"
            body = mutate(body, api, decision.model if fallback else None) or body
        await self._forward(scope, receive, send, decision, exchange, body)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, decision: Decision,
                       exchange: _Exchange, body: bytes) -> None:
        drop = {*decision.remove_headers, *decision.headers, *_REPLACED}
        raw_headers = [(k, v) for k, v in scope.get("headers", [])
                       if k.decode("latin-1").lower() not in drop]
        raw_headers += [(k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in decision.headers.items() if v]
        raw_headers += [(b"content-length", str(len(body)).encode()),
                        (b"x-request-id", exchange.request_id.encode())]
        child = {**scope, "headers": raw_headers}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        extra = [(k.encode("latin-1"), v.encode("latin-1"))
                 for k, v in {**decision.response_headers,
                              "x-request-id": exchange.request_id}.items()]

        async def metered_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.start(_headers(message))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body":
                exchange.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    # Charged before the last chunk goes out, as ext_proc does: once the
                    # client has the whole answer, its cost is on the books.
                    await self._charge(exchange, "complete")
            await send(message)

        try:
            await self.app(child, replay, metered_send)
        finally:
            if not exchange.done:
                # Cut short (client gone, app error): charge what was seen.
                await self._charge(exchange, "incomplete")

    async def _charge(self, exchange: _Exchange, reason: str) -> None:
        # In a task of its own: a client that hangs up once it has read `data: [DONE]` gets
        # the request cancelled, and the commit must not be cancelled with it.
        task = asyncio.get_running_loop().create_task(exchange.finish(reason))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        await asyncio.shield(task)
