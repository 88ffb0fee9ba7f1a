"""Who may call the admin API (see sidecar.admin_access), and from where."""

from __future__ import annotations

from starlette.requests import Request

from sidecar.admin_access import AdminDenied
from sidecar.client_addr import client_address
from sidecar.headers import join_headers
from sidecar.http.envelope import ApiError
from sidecar.http.same_origin import check_write
from sidecar.model import Identity
from sidecar.services import Services


def request_headers(request: Request) -> dict[str, str]:
    return join_headers(request.headers.items())


def client_addr(services: Services, request: Request) -> str:
    """The address rate limits count: X-Forwarded-For only from configured proxies."""
    peer = request.client.host if request.client is not None else "unknown"
    forwarded = ",".join(request.headers.getlist("x-forwarded-for"))
    return client_address(peer, forwarded, services.ruleset.config.http.trusted_proxies)


async def caller(services: Services, request: Request) -> Identity:
    """Any authenticated caller; 401 otherwise."""
    found = await services.engine.identify(request_headers(request))
    if not isinstance(found, tuple):
        raise ApiError(401, "authentication required: " + found.body.decode())
    return found[0]


async def require_admin(services: Services, request: Request) -> str:
    """The admin's name for audit logs; 401 without credentials, 403 without the right,
    429 after too many failures, and 403/415 for a write a foreign page could have sent."""
    config = services.ruleset.config
    try:
        admin = await services.admin_gate.authorize(
            request_headers(request), client_addr(services, request)
        )
    except AdminDenied as exc:
        headers = {} if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
        raise ApiError(exc.status, exc.message, headers=headers) from None
    check_write(request, admin.carriers, config.identity.device_login.public_url)
    return admin.name
