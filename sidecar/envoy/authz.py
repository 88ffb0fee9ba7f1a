"""ext_authz v3: CheckRequest → RequestAttrs, Decision → CheckResponse. Translation only."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import struct_pb2
from google.rpc import code_pb2

from sidecar import tracing
from sidecar.engine import Engine
from sidecar.envoy.attach import CHECK_TIMEOUT_SECONDS
from sidecar.envoy.upstream import upstream_api
from sidecar.headers import clean, join_headers
from sidecar.metering.request_body import BodyAction, body_action
from sidecar.metrics import CHECK_QUEUED_SECONDS
from sidecar.model import Decision, RequestAttrs

# gRPC status Envoy sees for each HTTP status of a deny (Envoy only looks at OK vs not OK,
# but access logs and stats show the code, so make it mean something).
_GRPC_CODE = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    429: code_pb2.RESOURCE_EXHAUSTED,
    503: code_pb2.UNAVAILABLE,
}
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
METADATA_NAMESPACE = "sidecar"
# Set on calls whose body ext_proc must change; ext_proc only runs for those
# (sidecar/envoy/attach.py) and removes it before the call goes upstream.
BODY_HEADER = "x-sidecar-body"


def attrs_from_check(request: external_auth_pb2.CheckRequest) -> RequestAttrs:
    http = request.attributes.request.http
    headers = join_headers(
        (
            (h.key, h.value or h.raw_value.decode("utf-8", "replace"))
            for h in http.header_map.headers
        ),
        into={k.lower(): v for k, v in http.headers.items()},
    )
    body = http.raw_body or (http.body.encode() if http.body else None)
    return RequestAttrs(
        method=http.method,
        path=http.path,
        headers=headers,
        body=body,
        request_id=headers.get("x-request-id", "") or http.id,
    )


def _add_headers(options: Any, items: Iterable[tuple[str, str]]) -> None:
    # Filled in place: building each HeaderValueOption and copying it into the response
    # cost three times as much, and a decision sets about eight headers.
    add = options.add
    for name, value in items:
        option = add()
        option.header.key = name
        option.header.value = value if value.isprintable() else clean(value)
        option.append_action = OVERWRITE


def _fill_metadata(meta: struct_pb2.Struct, decision: Decision, action: BodyAction) -> None:
    fields = meta.fields[METADATA_NAMESPACE].struct_value.fields
    fields["decision"].string_value = decision.reason
    identity = decision.identity
    if identity is not None:
        fields["kind"].string_value = identity.kind
        fields["subject"].string_value = identity.subject
        fields["email"].string_value = identity.email
        fields["groups"].string_value = ",".join(identity.groups)
        fields["token_name"].string_value = identity.token_name
    if decision.model:
        fields["model"].string_value = decision.model
    if decision.input_tokens:
        # For the metering record (sidecar/envoy/access_log.py): the Check read the prompt.
        fields["input_tokens"].number_value = decision.input_tokens
    if action == "insert_usage_option":
        # The Lua filter inserts `stream_options` itself: no ext_proc stream for this call.
        fields["body"].string_value = action


def check_response(decision: Decision, action: BodyAction = "") -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse()
    _fill_metadata(response.dynamic_metadata, decision, action)
    if decision.allowed:
        response.status.code = code_pb2.OK
        ok = response.ok_response
        _add_headers(ok.headers, ((k, v) for k, v in decision.headers.items() if v))
        # The provider key replaces whatever the client sent in that header (OVERWRITE).
        _add_headers(ok.headers, decision.upstream_secrets.items())
        if action == "ext_proc":
            _add_headers(ok.headers, ((BODY_HEADER, "rewrite"),))
        # An empty value is expressed as removal, so a client-sent value can never survive.
        ok.headers_to_remove.extend(
            sorted({*decision.remove_headers, *(k for k, v in decision.headers.items() if not v)})
        )
        _add_headers(ok.response_headers_to_add, decision.response_headers.items())
        return response
    response.status.code = _GRPC_CODE.get(decision.http_status, code_pb2.UNKNOWN)
    denied = response.denied_response
    denied.status.code = decision.http_status
    _add_headers(denied.headers, decision.headers.items())
    denied.body = decision.body.decode()
    return response


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        # Envoy sends its ext_authz timeout as the gRPC deadline: a Check that cannot be
        # answered within it is refused at once (503) rather than answered too late.
        attrs, deadline = attrs_from_check(request), context.time_remaining()
        if deadline is not None and deadline <= CHECK_TIMEOUT_SECONDS:
            # gRPC set the deadline when the Check arrived; what is gone of it is the time it
            # queued (in gRPC and for the event loop) before this handler ran.
            CHECK_QUEUED_SECONDS.observe(CHECK_TIMEOUT_SECONDS - deadline)
        if tracing.ENABLED:
            # When Envoy traces, its ext_authz span travels in the call's metadata; else the
            # request's own traceparent (in attrs.headers) is the parent.
            with tracing.remote_parent(dict(context.invocation_metadata() or ())):
                return self._answer(attrs, await self._engine.check(attrs, deadline))
        return self._answer(attrs, await self._engine.check(attrs, deadline))

    def _answer(self, attrs: RequestAttrs, decision: Decision) -> external_auth_pb2.CheckResponse:
        if not (decision.allowed and decision.request_id and attrs.body):
            return check_response(decision)
        fallback = decision.headers.get("x-sidecar-route") == "fallback"
        api = upstream_api(
            self._engine.holder.current, attrs.path, fallback=fallback, provider=decision.provider
        )
        return check_response(
            decision, body_action(attrs.body, api, decision.model if fallback else None)
        )
