"""ext_proc v3: rewrites the model on fallback, meters usage from the response as it streams,
and commits the actual cost when the response ends. Responses pass through unchanged."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from sidecar.engine import Engine
from sidecar.metering.parse import UsageMeter, api_for_path

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
    meter: UsageMeter | None = None
    committed: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def _headers(message: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for header in message.headers.headers:
        out[header.key.lower()] = header.value or header.raw_value.decode("utf-8", "replace")
    return out


def rewrite_model(body: bytes, model: str) -> bytes | None:
    """The body with its `model` replaced, or None when it need not (or cannot) change."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("model") == model:
        return None
    data["model"] = model
    return json.dumps(data, separators=(",", ":")).encode()


class ExternalProcessorServicer(
    external_processor_pb2_grpc.ExternalProcessorServicer  # type: ignore[misc]
):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ProcessingResponse]:
        ex = Exchange()
        try:
            async for message in request_iterator:
                yield await self._step(ex, message)
        finally:
            # The client went away or Envoy reset the stream: charge what was seen.
            if not ex.committed:
                await self._commit(ex, reason="incomplete")

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
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse())
        if kind == "request_body":
            return pb.ProcessingResponse(request_body=self._request_body(ex, message))
        if kind == "response_headers":
            return self._response_headers(ex, message)
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

    def _request_body(self, ex: Exchange, message: pb.ProcessingRequest) -> pb.BodyResponse:
        if not (ex.fallback and ex.model):
            return pb.BodyResponse()
        new_body = rewrite_model(message.request_body.body, ex.model)
        if new_body is None:
            return pb.BodyResponse()
        return pb.BodyResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="content-length",
                                            raw_value=str(len(new_body)).encode()),
                append_action=OVERWRITE)]),
            body_mutation=pb.BodyMutation(body=new_body),
        ))

    def _response_headers(
        self, ex: Exchange, message: pb.ProcessingRequest
    ) -> pb.ProcessingResponse:
        headers = _headers(message.response_headers)
        api = api_for_path(ex.path)
        if api is None or not ex.model or not ex.request_id:
            # Nothing to meter: stop sending this response's body to us at all.
            return pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(),
                mode_override=processing_mode_pb2.ProcessingMode(
                    response_body_mode=processing_mode_pb2.ProcessingMode.NONE),
            )
        ex.meter = UsageMeter.for_response(api, headers.get("content-type", ""),
                                           headers.get("content-encoding", ""))
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())

    async def _commit(self, ex: Exchange, reason: str) -> None:
        if ex.committed or ex.meter is None or not ex.request_id:
            return
        ex.committed = True
        ex.meter.finish()
        usage = ex.meter.usage
        if usage is None:
            # Nothing observed: the reservation stays and is charged its estimate at expiry.
            log.warning("no_usage_observed", request_id=ex.request_id, model=ex.model,
                        reason=reason)
            return
        try:
            await self._engine.commit(ex.request_id, ex.model, ex.provider, usage)
        except Exception as exc:  # the response must flow even when the store is down
            log.error("commit_failed", request_id=ex.request_id, error=str(exc))
