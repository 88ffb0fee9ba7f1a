"""`/v1/service-tokens`: create (secret shown once), list, revoke."""

from __future__ import annotations

import re
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sidecar.http.auth import require_admin
from sidecar.http.envelope import ApiError, json_object, ok, reject_unknown
from sidecar.policy.windows import parse_duration
from sidecar.services import Services

log = structlog.get_logger("sidecar.admin")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_GROUP = re.compile(r"^[^\x00-\x1f,]{1,128}$")


def parse_create(data: dict[str, Any]) -> tuple[str, list[str], int | None]:
    reject_unknown(data, {"name", "groups", "expires"})
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ApiError(400, "name must be 1-128 characters of letters, digits, '_', '.', '-'")
    groups = data.get("groups", [])
    if not isinstance(groups, list) or len(groups) > 50 or not all(
        isinstance(g, str) and _GROUP.match(g) for g in groups
    ):
        raise ApiError(400, "groups must be a list of up to 50 names without commas")
    expires = data.get("expires")
    ttl: int | None = None
    if expires is not None:
        if not isinstance(expires, str):
            raise ApiError(400, "expires must be a duration such as '30d' or '12h'")
        try:
            ttl = parse_duration(expires)
        except ValueError as exc:
            raise ApiError(400, f"expires: {exc}") from None
    return name, list(dict.fromkeys(groups)), ttl


def routes(services: Services) -> list[Route]:
    async def create(request: Request) -> JSONResponse:
        admin = await require_admin(services, request)
        name, groups, ttl = parse_create(await json_object(request))
        issued = await services.service_tokens.create(name, groups, ttl)
        log.info("service_token_created", id=issued.id, name=name, by=admin)
        return ok({"id": issued.id, "name": issued.name, "client_id": issued.client_id,
                   "client_secret": issued.client_secret, "groups": list(issued.groups),
                   "expires_at": issued.expires_at}, status=201)

    async def listing(request: Request) -> JSONResponse:
        await require_admin(services, request)
        tokens = await services.service_tokens.list()
        return ok(tokens, result_info={"page": 1, "per_page": len(tokens),
                                       "total_count": len(tokens), "has_more": False})

    async def revoke(request: Request) -> JSONResponse:
        admin = await require_admin(services, request)
        token_id = request.path_params["token_id"]
        revoked = await services.service_tokens.revoke(token_id)
        if revoked is None:
            raise ApiError(404, f"no service token {token_id!r}")
        log.info("service_token_revoked", id=revoked["id"], name=revoked["name"], by=admin)
        return ok(revoked)

    return [
        Route("/v1/service-tokens", create, methods=["POST"]),
        Route("/v1/service-tokens", listing, methods=["GET"]),
        Route("/v1/service-tokens/{token_id}", revoke, methods=["DELETE"]),
    ]
