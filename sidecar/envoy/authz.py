"""ext_authz v3: CheckRequest → RequestAttrs, Decision → CheckResponse. Translation only."""

from __future__ import annotations

import re

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from sidecar.engine import Engine
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
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
METADATA_NAMESPACE = "sidecar"


def attrs_from_check(request: external_auth_pb2.CheckRequest) -> RequestAttrs:
    http = request.attributes.request.http
    headers: dict[str, str] = {k.lower(): v for k, v in http.headers.items()}
    for header in http.header_map.headers:
        name = header.key.lower()
        value = header.value or header.raw_value.decode("utf-8", "replace")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    body = http.raw_body or (http.body.encode() if http.body else None)
    return RequestAttrs(
        method=http.method,
        path=http.path,
        headers=headers,
        body=body,
        request_id=headers.get("x-request-id", "") or http.id,
    )


def _option(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=_UNSAFE.sub(" ", value)),
        append_action=OVERWRITE,
    )


def _metadata(decision: Decision) -> struct_pb2.Struct:
    meta = struct_pb2.Struct()
    identity = decision.identity
    fields: dict[str, str] = {"decision": decision.reason}
    if identity is not None:
        fields.update(kind=identity.kind, subject=identity.subject, email=identity.email,
                      groups=",".join(identity.groups), token_name=identity.token_name)
    if decision.model:
        fields["model"] = decision.model
    meta.update({METADATA_NAMESPACE: fields})
    return meta


def check_response(decision: Decision) -> external_auth_pb2.CheckResponse:
    if decision.allowed:
        set_headers = {k: v for k, v in decision.headers.items() if v}
        # An empty value is expressed as removal, so a client-sent value can never survive.
        remove = sorted({*decision.remove_headers,
                         *(k for k, v in decision.headers.items() if not v)})
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_option(k, v) for k, v in set_headers.items()],
                headers_to_remove=remove,
                response_headers_to_add=[
                    _option(k, v) for k, v in decision.response_headers.items()
                ],
            ),
            dynamic_metadata=_metadata(decision),
        )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=_GRPC_CODE.get(decision.http_status, code_pb2.UNKNOWN)),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.http_status),
            headers=[_option(k, v) for k, v in decision.headers.items()],
            body=decision.body.decode(),
        ),
        dynamic_metadata=_metadata(decision),
    )


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return check_response(await self._engine.check(attrs_from_check(request)))


