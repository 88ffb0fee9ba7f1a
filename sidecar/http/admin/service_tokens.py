"""`/v1/service-tokens`: create (secret shown once, optionally with the token's own spend
limit), list, rotate and revoke by id or name."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sidecar.http.admin.spend_limits import add_limit, check_new, validate_rule
from sidecar.http.auth import require_admin
from sidecar.http.envelope import ApiError, json_object, listed, ok, reject_unknown
from sidecar.identity.service_tokens import IssuedToken, NameTaken, public_view
from sidecar.policy.windows import parse_duration
from sidecar.services import Services

log = structlog.get_logger("sidecar.admin")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_GROUP = re.compile(r"^[^\x00-\x1f,]{1,128}$")
CALENDAR = ("daily", "weekly", "monthly")
T = TypeVar("T")


def parse_create(data: dict[str, Any]) -> tuple[str, list[str], int | None]:
    reject_unknown(data, {"name", "groups", "expires", "budget_usd", "window"})
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ApiError(400, "name must be 1-128 characters of letters, digits, '_', '.', '-'")
    groups = data.get("groups", [])
    if (
        not isinstance(groups, list)
        or len(groups) > 50
        or not all(isinstance(g, str) and _GROUP.match(g) for g in groups)
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


def token_limit(name: str, data: dict[str, Any]) -> dict[str, Any] | None:
    """The token's own spend limit (`budget_usd`, `window`), validated; None without one."""
    if "budget_usd" not in data:
        if "window" in data:
            raise ApiError(400, "window needs budget_usd")
        return None
    window = data.get("window", "daily")
    if not isinstance(window, str):
        raise ApiError(400, "window must be daily, weekly, monthly or a duration such as 24h")
    spec = {"fixed": window} if window in CALENDAR else {"rolling": window}
    return validate_rule(
        {
            "name": f"token-{name}",
            "budget_usd": data["budget_usd"],
            "window": spec,
            "filter": {"token": [name]},
            "action": "block",
        }
    )


def issued_json(issued: IssuedToken) -> dict[str, Any]:
    return {
        "id": issued.id,
        "name": issued.name,
        "client_id": issued.client_id,
        "client_secret": issued.client_secret,
        "groups": list(issued.groups),
        "expires_at": issued.expires_at,
    }


def routes(services: Services) -> list[Route]:
    async def create(request: Request) -> JSONResponse:
        admin = await require_admin(services, request)
        data = await json_object(request)
        name, groups, ttl = parse_create(data)
        limit = token_limit(name, data)
        if limit is not None:
            await check_new(services, limit["name"])
        try:
            issued = await services.service_tokens.create(name, groups, ttl)
        except NameTaken:
            raise ApiError(
                409,
                f"a service token named {name!r} already exists; revoke it or rotate its secret",
            ) from None
        log.info("service_token_created", id=issued.id, name=name, by=admin)
        await services.audit(
            admin,
            "service_token.create",
            name,
            None,
            public_view(await services.service_tokens.find(issued.id) or {}),
        )
        result = issued_json(issued)
        if limit is not None:
            result["spend_limit"] = await add_limit(services, admin, limit)
        return ok(result, status=201)

    async def listing(request: Request) -> JSONResponse:
        await require_admin(services, request)
        tokens = await services.service_tokens.list()
        return listed(tokens)

    async def changed(
        request: Request, change: Callable[[str], Awaitable[T | None]], missing: str
    ) -> tuple[str, dict[str, Any], T]:
        """The admin, the token named in the path as it was, and what `change` made of it
        (404 with `missing` when there is no such token or `change` found none)."""
        admin = await require_admin(services, request)
        ref = request.path_params["token_id"]
        before = await services.service_tokens.find(ref)
        after = await change(ref)
        if after is None or before is None:
            raise ApiError(404, f"no {missing} with id or name {ref!r}")
        return admin, before, after

    async def revoke(request: Request) -> JSONResponse:
        admin, before, revoked = await changed(
            request, services.service_tokens.revoke, "service token"
        )
        log.info("service_token_revoked", id=revoked["id"], name=revoked["name"], by=admin)
        if before["revoked_at"] is None:
            await services.audit(
                admin, "service_token.revoke", revoked["name"], public_view(before), revoked
            )
        return ok(revoked)

    async def rotate(request: Request) -> JSONResponse:
        admin, before, issued = await changed(
            request, services.service_tokens.rotate, "live service token"
        )
        log.info("service_token_rotated", id=issued.id, name=issued.name, by=admin)
        after = await services.service_tokens.find(issued.id)
        await services.audit(
            admin,
            "service_token.rotate",
            issued.name,
            public_view(before),
            public_view(after or {}),
        )
        return ok(issued_json(issued))

    return [
        Route("/v1/service-tokens", create, methods=["POST"]),
        Route("/v1/service-tokens", listing, methods=["GET"]),
        Route("/v1/service-tokens/{token_id}", revoke, methods=["DELETE"]),
        Route("/v1/service-tokens/{token_id}/rotate", rotate, methods=["POST"]),
    ]
