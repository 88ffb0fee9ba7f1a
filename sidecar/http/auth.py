"""Who may call the admin API: the bearer admin token, or an identity in an admin group."""

from __future__ import annotations

import hmac
import os

from starlette.requests import Request

from sidecar.http.envelope import ApiError
from sidecar.model import Identity
from sidecar.services import Services


def request_headers(request: Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers


async def caller(services: Services, request: Request) -> Identity:
    """Any authenticated caller; 401 otherwise."""
    found = await services.engine.identify(request_headers(request))
    if not isinstance(found, tuple):
        raise ApiError(401, "authentication required: " + found.body.decode())
    return found[0]


async def require_admin(services: Services, request: Request) -> str:
    """The admin's name for audit logs; 401 without credentials, 403 without the right."""
    config = services.ruleset.config.admin
    token = os.environ.get(config.token_env, "")
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    is_bearer = token and scheme.lower() == "bearer" and presented
    if is_bearer and hmac.compare_digest(presented.strip().encode(), token.encode()):
        return "admin-token"
    found = await services.engine.identify(request_headers(request))
    if not isinstance(found, tuple):
        raise ApiError(401, "admin authentication required")
    identity = found[0]
    if set(identity.groups) & set(config.groups):
        return identity.user
    raise ApiError(403, "not an administrator")
