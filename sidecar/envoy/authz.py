"""ext_authz v3: CheckRequest → RequestAttrs, Decision → CheckResponse. Translation only."""

from __future__ import annotations

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2

from sidecar import tracing
from sidecar.decisions import OVERLOADED, RESERVATION_HEADER
from sidecar.engine import Engine
from sidecar.envoy import check_wire as wire
from sidecar.envoy.attach import CHECK_TIMEOUT_SECONDS
from sidecar.envoy.unanswered import CallKey, Unanswered, call_key
from sidecar.envoy.upstream import upstream_api
from sidecar.headers import clean, join_headers
from sidecar.metering.request_body import BodyAction, body_action
from sidecar.metrics import CHECK_QUEUED_SECONDS, observer
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
_OK_STATUS = wire.status(code_pb2.OK)
_observe_queued = observer(CHECK_QUEUED_SECONDS)
METADATA_NAMESPACE = "sidecar"
SERVICE = "envoy.service.auth.v3.Authorization"
# Set on calls whose body ext_proc must change; ext_proc only runs for those
# (sidecar/envoy/attach.py) and removes it before the call goes upstream.
BODY_HEADER = "x-sidecar-body"


def attrs_from_check(request: external_auth_pb2.CheckRequest) -> RequestAttrs:
    http = request.attributes.request.http
    raw = http.headers
    # By key, then value: the map's items() is a Python generator over the same lookups.
    headers = {k.lower(): raw[k] for k in raw}
    if http.HasField("header_map"):
        # Envoy sends its headers here instead with `encode_raw_headers` (not by default).
        headers = join_headers(
            (
                (h.key, h.value or h.raw_value.decode("utf-8", "replace"))
                for h in http.header_map.headers
            ),
            into=headers,
        )
    body = http.raw_body or (http.body.encode() if http.body else None)
    return RequestAttrs(
        method=http.method,
        path=http.path,
        headers=headers,
        body=body,
        request_id=headers.get("x-request-id", "") or http.id,
    )


# An admitted Check answered with less than this left before Envoy's deadline is withdrawn:
# the answer still has to cross to Envoy, which stops waiting at the deadline.
ANSWER_MARGIN_SECONDS = 0.002


# The reservation id is new on every Check: not worth keeping.
_OK_HEADERS = wire.HeaderFields(wire.OK_HEADERS, clean, unique=(RESERVATION_HEADER,))
_OK_RESPONSE_HEADERS = wire.HeaderFields(wire.OK_RESPONSE_HEADERS, clean)
_DENIED_HEADERS = wire.HeaderFields(wire.DENIED_HEADERS, clean)


def _metadata(decision: Decision, action: BodyAction) -> bytes:
    entries = wire.cached_string_entry("decision", decision.reason)
    identity = decision.identity
    if identity is not None:
        entries += wire.cached_identity_entries(identity)
    if decision.model:
        entries += wire.cached_string_entry("model", decision.model)
    if decision.input_tokens:
        # For the metering record (sidecar/envoy/access_log.py): the Check read the prompt.
        entries += wire.input_tokens_entry(decision.input_tokens)
    if action == "insert_usage_option":
        # The Lua filter inserts `stream_options` itself: no ext_proc stream for this call.
        entries += wire.string_entry("body", action)
    return wire.metadata(METADATA_NAMESPACE, entries)


def check_response_bytes(decision: Decision, action: BodyAction = "") -> bytes:
    """The serialized CheckResponse for `decision` (see sidecar/envoy/check_wire.py)."""
    if decision.allowed:
        headers = decision.headers
        upstream = [(k, v) for k, v in headers.items() if v]
        # The provider key replaces whatever the client sent in that header (OVERWRITE).
        upstream += decision.upstream_secrets.items()
        if action == "ext_proc":
            upstream.append((BODY_HEADER, "rewrite"))
        # An empty value is expressed as removal, so a client-sent value can never survive.
        removed = sorted({*decision.remove_headers, *(k for k, v in headers.items() if not v)})
        ok = (
            _OK_HEADERS(upstream)
            + b"".join([wire.field(wire.OK_REMOVE, name.encode()) for name in removed])
            + _OK_RESPONSE_HEADERS(decision.response_headers.items())
        )
        return _OK_STATUS + wire.field(wire.CHECK_OK, ok) + _metadata(decision, action)
    denied = (
        wire.field(wire.DENIED_STATUS, b"\x08" + wire.varint(decision.http_status))
        + _DENIED_HEADERS(decision.headers.items())
        + wire.field(wire.DENIED_BODY, decision.body.decode().encode())
    )
    return (
        wire.status(_GRPC_CODE.get(decision.http_status, code_pb2.UNKNOWN))
        + wire.field(wire.CHECK_DENIED, denied)
        + _metadata(decision, action)
    )


_LATE_ANSWER = check_response_bytes(OVERLOADED)


def check_response(decision: Decision, action: BodyAction = "") -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse.FromString(check_response_bytes(decision, action))


def checked_call(request: external_auth_pb2.CheckRequest, attrs: RequestAttrs) -> CallKey | None:
    """The call a CheckRequest is about, as Envoy's access log names it (unanswered.py);
    None when Envoy sent no start time. `attrs`: the request's, its headers already read."""
    started = request.attributes.request.time
    if not started.seconds:
        return None
    return call_key(started.seconds, started.nanos, attrs.headers.get("x-request-id", ""))


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, engine: Engine, unanswered: Unanswered | None = None) -> None:
        self._engine = engine
        # Shared with the access log servicer, which learns of calls that went away.
        self.unanswered = Unanswered() if unanswered is None else unanswered

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        """The Check as the generated servicer declares it (a message). `sidecar serve`
        registers `check` instead (see `add_to_server`), which answers with the bytes."""
        return external_auth_pb2.CheckResponse.FromString(await self.check(request, context))

    async def check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        """The serialized CheckResponse for `request`."""
        # Envoy sends its ext_authz timeout as the gRPC deadline: a Check that cannot be
        # answered within it is refused at once (503) rather than answered too late.
        attrs, deadline = attrs_from_check(request), context.time_remaining()
        if deadline is not None and deadline <= CHECK_TIMEOUT_SECONDS:
            # gRPC set the deadline when the Check arrived; what is gone of it is the time it
            # queued (in gRPC and for the event loop) before this handler ran.
            _observe_queued(CHECK_TIMEOUT_SECONDS - deadline)
        if tracing.ENABLED:
            # When Envoy traces, its ext_authz span travels in the call's metadata; else the
            # request's own traceparent (in attrs.headers) is the parent.
            with tracing.remote_parent(dict(context.invocation_metadata() or ())):
                decision = await self._engine.check(attrs, deadline)
        else:
            decision = await self._engine.check(attrs, deadline)
        if (
            decision.allowed
            and decision.request_id
            and self._unanswerable(request, attrs, decision, deadline, context)
        ):
            # An allow Envoy never acts on would leave the reservation to expire into a
            # charge for a call nobody made: refused, and released at $0.
            await self._engine.withdraw(decision.request_id)
            return _LATE_ANSWER
        return self._answer(attrs, decision)

    def _unanswerable(
        self,
        request: external_auth_pb2.CheckRequest,
        attrs: RequestAttrs,
        decision: Decision,
        deadline: float | None,
        context: grpc.aio.ServicerContext,
    ) -> bool:
        """Whether Envoy will not act on this admitted call's answer: decided too late (the
        process stalled, or the store was slow: Envoy refuses the call at its deadline, or
        will before the answer reaches it; refusing is right either way), or the call is
        gone already (the client left while the Check waited, and Envoy logged it)."""
        if deadline is not None and context.time_remaining() <= ANSWER_MARGIN_SECONDS:
            return True
        key = checked_call(request, attrs)
        return key is not None and self.unanswered.admitted(key, decision.request_id)

    def _answer(self, attrs: RequestAttrs, decision: Decision) -> bytes:
        if not (decision.allowed and decision.request_id and attrs.body):
            return check_response_bytes(decision)
        fallback = decision.headers.get("x-sidecar-route") == "fallback"
        api = upstream_api(
            self._engine.holder.current, attrs.path, fallback=fallback, provider=decision.provider
        )
        return check_response_bytes(
            decision, body_action(attrs.body, api, decision.model if fallback else None)
        )


def add_to_server(servicer: AuthorizationServicer, server: grpc.aio.Server) -> None:
    """Serve `servicer` as envoy.service.auth.v3.Authorization, its Check answering with
    the bytes `check` writes: no CheckResponse message is built or serialized."""
    check = grpc.unary_unary_rpc_method_handler(
        servicer.check,
        request_deserializer=external_auth_pb2.CheckRequest.FromString,
        response_serializer=None,  # `check` returns the serialized response
    )
    handlers = {"Check": check}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    # As the generated registration does: gRPC finds the method without the generic
    # handlers' lookup in Python.
    server.add_registered_method_handlers(SERVICE, handlers)
