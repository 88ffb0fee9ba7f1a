"""`/v1/cli-sessions` (admin): the device-login sessions, and revoking one (its refresh
token and every access token it issued stop working)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sidecar.http.auth import require_admin
from sidecar.http.envelope import ApiError, listed, ok
from sidecar.identity.cli_sessions import CliSessions, public_view
from sidecar.services import Services


def routes(services: Services) -> list[Route]:
    def sessions() -> CliSessions:
        if services.cli_sessions is None:
            raise ApiError(404, "device login is not enabled")
        return services.cli_sessions

    async def listing(request: Request) -> JSONResponse:
        await require_admin(services, request)
        found = await sessions().list()
        return listed(found)

    async def revoke(request: Request) -> JSONResponse:
        admin = await require_admin(services, request)
        sid = request.path_params["session_id"]
        done = await sessions().revoke(sid, admin)
        if done is None:
            raise ApiError(404, f"no CLI session {sid!r}")
        before, after = done
        if before["revoked_at"] is None:
            await services.audit(
                admin, "cli_session.revoke", sid, public_view(before), public_view(after)
            )
        return ok(public_view(after))

    return [
        Route("/v1/cli-sessions", listing, methods=["GET"]),
        Route("/v1/cli-sessions/{session_id}", revoke, methods=["DELETE"]),
    ]
