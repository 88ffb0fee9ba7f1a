"""ext_proc v3: adjusts the request body (fallback model, OpenAI stream usage), meters usage
from the response as it streams, and commits the actual cost when the response ends.
Responses pass through unchanged.

Every admitted call is charged once its exchange ends: the observed usage when there is any
(a stream cut short keeps what it saw), else its admission estimate, right away rather than
at reservation expiry. Envoy's own local replies (a 429 from ext_authz) open a stream that
starts at the response headers, with no request phases: they were never admitted and are
not metered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from sidecar.engine import Engine
from sidecar.envoy.request_body import mutate
from sidecar.metering import load_json
from sidecar.metering.parse import Api, UsageMeter, api_for_path

log = structlog.get_logger("sidecar.ext_proc")
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass
class Exchange:
    """What one request/response pair has shown so far."""

    request_id: str = ""
    path: str = ""
    model: str = ""
    provider: str = ""
    fallback: bool = False
    api: Api | None = None
    # The request body as the client sent it, kept to compute the estimate if no usage shows.
    body: bytes = b""
    status: str = ""
    meter: UsageMeter | None = None
    committed: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def _headers(message: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for header in message.headers.headers:
        out[header.key.lower()] = header.value or header.raw_value.decode("utf-8", "replace")
    return out


def _parsed(body: bytes) -> Mapping[str, Any]:
    data = load_json(body) if body else None
    return data if isinstance(data, dict) else {}


class ExternalProcessorServicer(
    external_processor_pb2_grpc.ExternalProcessorServicer  # type: ignore[misc]
):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # Commits started while a stream is torn down; held so they are not collected.
        self._finishing: set[asyncio.Task[None]] = set()

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        # A coroutine writing with context.write rather than an async generator: when Envoy
        # resets the stream, a generator's `finally` only runs whenever it is garbage
        # collected (or never), and the charge of a cut-short response would be lost.
        ex = Exchange()
        try:
            async for message in request_iterator:
                await context.write(await self._step(ex, message))
        finally:
            # The client went away or Envoy reset the stream: charge what was seen. This
            # task may be being cancelled, so the commit runs in a task of its own.
            if not ex.committed:
                await self._commit(ex, "incomplete")

    async def _step(self, ex: Exchange, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            headers = _headers(message.request_headers)
            ex.headers = headers
            ex.request_id = headers.get("x-request-id", "")
            ex.path = headers.get(":path", "")
            ex.model = headers.get("x-sidecar-model", "")
            ex.provider = headers.get("x-sidecar-provider", "")
            ex.fallback = headers.get("x-sidecar-route") == "fallback"
            ex.api = self._upstream_api(ex)
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse())
        if kind == "request_body":
            return pb.ProcessingResponse(request_body=self._request_body(ex, message))
        if kind == "response_headers":
            return await self._response_headers(ex, message)
        if kind == "response_body":
            chunk = message.response_body
            if ex.meter is not None:
                ex.meter.feed(chunk.body)
            if chunk.end_of_stream:
                await self._commit(ex, reason="complete")
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        if kind == "request_trailers":
            return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

    def _upstream_api(self, ex: Exchange) -> Api | None:
        """The API the upstream answers with, which decides how its usage is read."""
        api = api_for_path(ex.path)
        if not ex.fallback:
            return api
        # A fallback to another model of the same provider keeps the request's path; one to
        # another provider goes to that provider's OpenAI-compatible chat completions
        # endpoint, whatever the client called (deploy/envoy/envoy.yaml).
        origin = self._engine.holder.current.provider_for_path(ex.path)
        return api if origin is not None and origin.id == ex.provider else "openai_chat"

    def _request_body(self, ex: Exchange, message: pb.ProcessingRequest) -> pb.BodyResponse:
        ex.body = message.request_body.body
        if not ex.model:
            return pb.BodyResponse()  # not admitted as an LLM call: leave it alone
        new_body = mutate(ex.body, ex.api, ex.model if ex.fallback else None)
        if new_body is None:
            return pb.BodyResponse()
        return pb.BodyResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="content-length",
                                            raw_value=str(len(new_body)).encode()),
                append_action=OVERWRITE)]),
            body_mutation=pb.BodyMutation(body=new_body),
        ))

    async def _response_headers(
        self, ex: Exchange, message: pb.ProcessingRequest
    ) -> pb.ProcessingResponse:
        headers = _headers(message.response_headers)
        ex.status = headers.get(":status", "")
        if ex.api is None or not ex.model or not ex.request_id:
            # Nothing to meter: stop sending this response's body to us at all. An admitted
            # call to an API without usage parsing pays its estimate now.
            await self._commit(ex, reason="unmetered_api")
            return pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(),
                mode_override=processing_mode_pb2.ProcessingMode(
                    response_body_mode=processing_mode_pb2.ProcessingMode.NONE),
            )
        ex.meter = UsageMeter.for_response(ex.api, headers.get("content-type", ""),
                                           headers.get("content-encoding", ""))
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())

    async def _commit(self, ex: Exchange, reason: str) -> None:
        """Charge the exchange in a task of its own, shielded: Envoy resetting the stream
        cancels this handler, and a cancelled commit would lose the charge."""
        task = asyncio.get_running_loop().create_task(self._charge(ex, reason))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        await asyncio.shield(task)

    async def _charge(self, ex: Exchange, reason: str) -> None:
        # Only calls that ext_authz admitted carry x-sidecar-model; Envoy's local replies
        # have no request phases at all.
        if ex.committed or not ex.model or not ex.request_id:
            return
        ex.committed = True
        usage = None
        if ex.meter is not None:
            ex.meter.finish()
            usage = ex.meter.usage
        fields = {"request_id": ex.request_id, "model": ex.model, "status": ex.status,
                  "reason": reason}
        try:
            if usage is not None:
                if ex.meter is not None and not ex.meter.complete:
                    log.warning("partial_usage_charged", **fields)
                await self._engine.commit(ex.request_id, ex.model, ex.provider, usage)
                return
            # Nothing observed (an error body, a stream cut before its usage, an API without
            # usage parsing, an undecodable body): never $0, so the estimate.
            log.warning("no_usage_observed", **fields,
                        meter_error=ex.meter.error if ex.meter else None)
            charged = await self._engine.commit_estimate(ex.request_id, ex.model, ex.provider,
                                                         _parsed(ex.body))
            if charged is None:
                log.warning("estimate_left_to_expiry", **fields)
        except Exception as exc:  # the response must flow even when the store is down
            # The reservation stays and is charged its estimate when it expires.
            log.error("commit_failed", request_id=ex.request_id, error=str(exc))
