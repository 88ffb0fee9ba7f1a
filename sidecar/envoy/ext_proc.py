"""ext_proc v3: adjusts the request body (fallback model, OpenAI stream usage), meters usage
from the response as it streams, and charges the exchange when the response ends.

Every admitted call is charged once its exchange ends (`sidecar.metering.exchange`), against
the reservation named by `x-sidecar-request-id`: the header ext_authz set, with overwrite,
to the id it minted, and which is removed here before the request goes upstream, so neither
the provider nor the client ever learns it. Model, provider and caller are read from that
reservation record, never from this stream's headers: a stream opened by anyone but Envoy
cannot move a charge (and with mTLS on the gRPC listener cannot be opened at all). Envoy's
own local replies (a 429
from ext_authz) open a stream that starts at the response headers, with no request phases:
they were never admitted and are not metered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2

from sidecar import tracing
from sidecar.decisions import RESERVATION_HEADER
from sidecar.engine import Engine
from sidecar.envoy.request_body import mutate
from sidecar.envoy.request_path import NoDeployment, PathChange, fallback_path
from sidecar.metering.exchange import MeteredExchange
from sidecar.metering.parse import Api, api_for_path

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
    body: bytes = b""
    strip_usage_event: bool = False
    metered: MeteredExchange | None = None
    # Set when a fallback rewrote a path that names the model.
    path_change: PathChange | None = None


def _headers(message: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for header in message.headers.headers:
        out[header.key.lower()] = header.value or header.raw_value.decode("utf-8", "replace")
    return out


class ExternalProcessorServicer(
    external_processor_pb2_grpc.ExternalProcessorServicer  # type: ignore[misc]
):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        if tracing.ENABLED:
            # When Envoy traces, its ext_proc span (in the call's metadata) parents the commit.
            with tracing.remote_parent(dict(context.invocation_metadata() or ())):
                await self._process(request_iterator, context)
        else:
            await self._process(request_iterator, context)

    async def _process(
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
            # The client went away or Envoy reset the stream: charge what was seen (before
            # any response: the reservation).
            if ex.request_id:
                await self._metered(ex).finish("incomplete")

    async def _step(self, ex: Exchange, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            headers = _headers(message.request_headers)
            ex.request_id = headers.get(RESERVATION_HEADER, "")
            ex.path = headers.get(":path", "")
            # Set by ext_authz (overwriting the client's): used to shape the request body
            # only; the charge reads the reservation record.
            ex.model = headers.get("x-sidecar-model", "")
            ex.provider = headers.get("x-sidecar-provider", "")
            ex.fallback = headers.get("x-sidecar-route") == "fallback"
            ex.api = self._upstream_api(ex)
            if tracing.ENABLED:
                # Else the request's own traceparent does, for the rest of this stream.
                tracing.adopt(headers)
            if not ex.request_id:
                return pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            try:
                ex.path_change = self._path_change(ex)
            except NoDeployment:
                return _no_deployment(ex.model)
            set_headers = [] if ex.path_change is None else [base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=":path", raw_value=ex.path_change.path.encode()),
                append_action=OVERWRITE)]
            # The reservation id stops here: neither the provider nor the client ever sees
            # it, so nobody but Envoy can name the reservation a usage report is for.
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse(
                response=pb.CommonResponse(header_mutation=pb.HeaderMutation(
                    set_headers=set_headers, remove_headers=[RESERVATION_HEADER]))))
        if kind == "request_body":
            return pb.ProcessingResponse(request_body=self._request_body(ex, message))
        if kind == "response_headers":
            return await self._response_headers(ex, message)
        if kind == "response_body":
            return pb.ProcessingResponse(response_body=await self._response_body(ex, message))
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

    def _path_change(self, ex: Exchange) -> PathChange | None:
        """A fallback to another model of the same provider, on an API that names the model
        in the path: the path naming the fallback model."""
        if not ex.fallback or not ex.model:
            return None
        rs = self._engine.holder.current
        origin = rs.provider_for_path(ex.path)
        if origin is None or origin.id != ex.provider:
            return None  # another provider: its fallback route sets the whole path
        return fallback_path(ex.path, ex.model, origin.deployments)

    def _request_body(self, ex: Exchange, message: pb.ProcessingRequest) -> pb.BodyResponse:
        ex.body = message.request_body.body
        if not ex.request_id or not ex.model:
            return pb.BodyResponse()  # not admitted as an LLM call: leave it alone
        model = ex.model if ex.fallback else None
        if ex.path_change is not None:
            # The path names the model; the body only where it names the deployment.
            model = ex.path_change.body_model
        change = mutate(ex.body, ex.api, model,
                        only_if_named=ex.path_change is not None)
        if change.body is None:
            return pb.BodyResponse()
        ex.strip_usage_event = change.strip_usage_event
        headers = [("content-length", str(len(change.body)))]
        if change.strip_usage_event:
            # The injected usage event is taken out of the response as it streams, which
            # needs the body as sent, not compressed.
            headers.append(("accept-encoding", "identity"))
        return pb.BodyResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
                    append_action=OVERWRITE)
                for name, value in headers]),
            body_mutation=pb.BodyMutation(body=change.body),
        ))

    async def _response_headers(
        self, ex: Exchange, message: pb.ProcessingRequest
    ) -> pb.ProcessingResponse:
        if not ex.request_id:
            # Not an admitted call (no reservation): nothing to meter or charge.
            return self._skip_body()
        headers = _headers(message.response_headers)
        metered = self._metered(ex)
        metered.start(headers.get(":status", ""), headers)
        if ex.api is None:
            # An admitted call to an API without usage parsing pays its reservation now.
            await metered.finish("unmetered_api")
            return self._skip_body()
        if not metered.rewrites_body:
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        # The client gets the stream without the injected usage event: its length changes.
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=pb.HeaderMutation(
                remove_headers=["content-length"]))))

    def _metered(self, ex: Exchange) -> MeteredExchange:
        if ex.metered is None:
            ex.metered = MeteredExchange(
                self._engine, ex.request_id, ex.api, ex.body,
                strip_usage_event=ex.strip_usage_event,
                hint=(ex.model, ex.provider) if ex.model else None)
        return ex.metered

    @staticmethod
    def _skip_body() -> pb.ProcessingResponse:
        # Stop sending this response's body to us at all.
        return pb.ProcessingResponse(
            response_headers=pb.HeadersResponse(),
            mode_override=processing_mode_pb2.ProcessingMode(
                response_body_mode=processing_mode_pb2.ProcessingMode.NONE),
        )

    async def _response_body(self, ex: Exchange,
                             message: pb.ProcessingRequest) -> pb.BodyResponse:
        chunk = message.response_body
        metered = ex.metered
        if metered is None:
            return pb.BodyResponse()
        out = metered.feed(chunk.body)
        if chunk.end_of_stream:
            out += metered.end()
            # Charged before the last chunk goes out: once the client has the whole
            # answer, its cost is on the books.
            await metered.finish("complete")
        if out is chunk.body or out == chunk.body:
            return pb.BodyResponse()
        return pb.BodyResponse(response=pb.CommonResponse(
            body_mutation=pb.BodyMutation(body=out)))


def _no_deployment(model: str) -> pb.ProcessingResponse:
    """No Azure deployment runs the fallback model: refuse rather than run another model
    than the one admitted and billed."""
    body = ('{"success":false,"error":{"type":"fallback_unavailable","message":'
            f'"no configured deployment runs the fallback model {model}"}}}}')
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable),
        headers=pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
            append_action=OVERWRITE)]),
        body=body.encode()))
