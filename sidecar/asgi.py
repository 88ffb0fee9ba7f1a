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
  else the estimate, when the exchange is cut short); an error status without usage costs
  $0 and counts as an error.

Budgets live in the store named by the config (SQLite file or Redis), so an app using this
middleware and an Envoy-fronted sidecar on the same store share them. Services are built on
the lifespan startup (or on the first request for servers without lifespan) and closed on
shutdown; pass `services=` to share ones built elsewhere (their owner starts and closes them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from sidecar.decisions import error_body
from sidecar.headers import join_headers
from sidecar.metering.exchange import MeteredExchange, drain_charges
from sidecar.metering.parse import api_for_path
from sidecar.metering.request_body import mutate
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
_REPLACED = frozenset({"content-length", "transfer-encoding"})


def _headers(scope: Scope) -> dict[str, str]:
    return join_headers(
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope.get("headers", [])
    )


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


class SidecarMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        config_path: str | Path | None = None,
        services: Services | None = None,
        exempt_paths: Sequence[str] = (),
        max_body: int = MAX_BODY,
    ) -> None:
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

    async def services(self) -> Services:
        if self._services is None:
            async with self._lock:
                if self._services is None:
                    assert self._config_path is not None
                    # An ASGI server may run this app in several workers: the store is shared.
                    services = await build_services(self._config_path, store_owner=False)
                    services.start_background()
                    self._services = services
        return self._services

    async def close(self) -> None:
        await drain_charges()
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
        try:
            body = await _read_body(receive, self._max_body)
        except ValueError as exc:
            await _respond(
                send,
                413,
                {"content-type": "application/json"},
                error_body("request_too_large", str(exc)),
            )
            return
        if body is None:
            return
        path = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        attrs = RequestAttrs(
            method=scope["method"],
            path=f"{path}?{query}" if query else path,
            headers=headers,
            body=body or None,
            request_id=headers.get("x-request-id", "")[:128],
        )
        decision = await services.engine.check(attrs)
        if not decision.allowed:
            await _respond(send, decision.http_status, decision.headers, decision.body)
            return
        api = api_for_path(path)
        strip = False
        if decision.request_id:
            fallback = decision.reason == "fallback"
            change = mutate(body, api, decision.model if fallback else None)
            body, strip = change.body or body, change.strip_usage_event
        exchange = MeteredExchange(
            services.engine, decision.request_id, api, body, strip_usage_event=strip
        )
        await self._forward(scope, receive, send, decision, exchange, body)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        decision: Decision,
        exchange: MeteredExchange,
        body: bytes,
    ) -> None:
        upstream = {**{k: v for k, v in decision.headers.items() if v}, **decision.upstream_secrets}
        drop = {*decision.remove_headers, *decision.headers, *upstream, *_REPLACED}
        raw_headers = [
            (k, v) for k, v in scope.get("headers", []) if k.decode("latin-1").lower() not in drop
        ]
        raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in upstream.items()]
        # The app gets the reservation id (x-sidecar-request-id, among the decision's
        # headers) to report usage against; the client never does. It also gets the
        # provider key the sidecar holds, in the provider's own header, to pass upstream.
        raw_headers.append((b"content-length", str(len(body)).encode()))
        child = {**scope, "headers": raw_headers}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        extra = [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in decision.response_headers.items()
        ]
        metered = bool(exchange.request_id)

        async def metered_send(message: Message) -> None:
            if not metered:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
                await send(message)
                return
            if message["type"] == "http.response.start":
                headers = _headers(message)
                exchange.start(str(message.get("status", "")), headers)
                raw = [*message.get("headers", []), *extra]
                if exchange.rewrites_body:
                    # The injected usage event is taken out: the length changes.
                    raw = [(k, v) for k, v in raw if k.lower() != b"content-length"]
                message = {**message, "headers": raw}
            elif message["type"] == "http.response.body":
                out = exchange.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    out += exchange.end()
                    # Charged before the last chunk goes out: once the client has the whole
                    # answer, its cost is on the books.
                    await exchange.finish("complete")
                message = {**message, "body": out}
            await send(message)

        try:
            await self.app(child, replay, metered_send)
        finally:
            if metered and not exchange.charged:
                # Cut short (client gone, app error): charge what was seen.
                await exchange.finish("incomplete")
