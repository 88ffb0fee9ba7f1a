"""ext_proc v3: the request body changes an admitted call needs before it goes upstream.

A fallback rewrites the JSON `model`; an OpenAI chat stream gets
`stream_options.include_usage` (a client cannot switch metering off) when its body already
has `stream_options` (the Lua filter inserts the member into a body without one). Envoy
only runs this filter for calls the Check marked (`x-sidecar-body: rewrite`, removed here).
Responses never come here: the Lua filter reads them as they stream and the access log
charges them (sidecar/envoy/meter.lua, sidecar/envoy/access_log.py). When usage was turned
on for a client that did not ask for it, this tells the Lua filter (dynamic metadata
`sidecar.body`), which then takes the usage event out of the stream the client receives.

Calls that ext_authz did not admit as LLM calls (no `x-sidecar-model`, which only ext_authz
can set: it removes every client-sent `x-sidecar-*` header) are left alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2

from sidecar import tracing
from sidecar.engine import Engine
from sidecar.envoy.attach import BODY_NAMESPACE
from sidecar.envoy.authz import BODY_HEADER
from sidecar.envoy.request_path import NoDeployment, PathChange, fallback_path
from sidecar.envoy.upstream import upstream_api
from sidecar.metering.parse import Api
from sidecar.metering.request_body import mutate

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass
class Exchange:
    """What one request has shown so far."""

    path: str = ""
    model: str = ""
    provider: str = ""
    fallback: bool = False
    api: Api | None = None
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
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        if tracing.ENABLED:
            # When Envoy traces, its ext_proc span (in the call's metadata) is the parent.
            with tracing.remote_parent(dict(context.invocation_metadata() or ())):
                await self._process(request_iterator, context)
        else:
            await self._process(request_iterator, context)

    async def _process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        ex = Exchange()
        async for message in request_iterator:
            await context.write(self._step(ex, message))

    def _step(self, ex: Exchange, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            headers = _headers(message.request_headers)
            # Set by ext_authz (overwriting the client's): they shape the body only; the
            # charge reads the reservation record.
            ex.path = headers.get(":path", "")
            ex.model = headers.get("x-sidecar-model", "")
            ex.provider = headers.get("x-sidecar-provider", "")
            ex.fallback = headers.get("x-sidecar-route") == "fallback"
            ex.api = upstream_api(
                self._engine.holder.current, ex.path, fallback=ex.fallback, provider=ex.provider
            )
            if tracing.ENABLED:
                # Else the request's own traceparent does, for the rest of this stream.
                tracing.adopt(headers)
            try:
                ex.path_change = self._path_change(ex)
            except NoDeployment:
                return _no_deployment(ex.model)
            set_headers = (
                []
                if ex.path_change is None
                else [
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(
                            key=":path", raw_value=ex.path_change.path.encode()
                        ),
                        append_action=OVERWRITE,
                    )
                ]
            )
            # The Check's mark that sent the call here goes no further.
            return pb.ProcessingResponse(
                request_headers=pb.HeadersResponse(
                    response=pb.CommonResponse(
                        header_mutation=pb.HeaderMutation(
                            set_headers=set_headers, remove_headers=[BODY_HEADER]
                        )
                    )
                )
            )
        if kind == "request_body":
            return self._request_body(ex, message.request_body.body)
        if kind == "request_trailers":
            return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        # Response phases are not asked for (processing_mode); an answer keeps Envoy going
        # should a config of its own ask anyway.
        if kind == "response_headers":
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        if kind == "response_body":
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

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

    @staticmethod
    def _request_body(ex: Exchange, body: bytes) -> pb.ProcessingResponse:
        if not ex.model:
            return pb.ProcessingResponse(request_body=pb.BodyResponse())
        model = ex.model if ex.fallback else None
        if ex.path_change is not None:
            # The path names the model; the body only where it names the deployment.
            model = ex.path_change.body_model
        change = mutate(body, ex.api, model, only_if_named=ex.path_change is not None)
        if change.body is None:
            return pb.ProcessingResponse(request_body=pb.BodyResponse())
        answer = pb.ProcessingResponse(
            request_body=pb.BodyResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(
                        set_headers=[
                            base_pb2.HeaderValueOption(
                                header=base_pb2.HeaderValue(
                                    key="content-length", raw_value=str(len(change.body)).encode()
                                ),
                                append_action=OVERWRITE,
                            )
                        ]
                    ),
                    body_mutation=pb.BodyMutation(body=change.body),
                )
            )
        )
        if change.strip_usage_event:
            answer.dynamic_metadata.fields[BODY_NAMESPACE].struct_value.fields[
                "strip_usage"
            ].bool_value = True
        return answer


def _no_deployment(model: str) -> pb.ProcessingResponse:
    """No Azure deployment runs the fallback model: refuse rather than run another model
    than the one admitted and billed."""
    body = (
        '{"success":false,"error":{"type":"fallback_unavailable","message":'
        f'"no configured deployment runs the fallback model {model}"}}}}'
    )
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable),
            headers=pb.HeaderMutation(
                set_headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(
                            key="content-type", raw_value=b"application/json"
                        ),
                        append_action=OVERWRITE,
                    )
                ]
            ),
            body=body.encode(),
        )
    )
