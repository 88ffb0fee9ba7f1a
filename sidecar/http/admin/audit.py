"""`GET /v1/audit` (admin): the audit trail of admin writes, newest first."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sidecar.audit import MAX_LISTED, latest
from sidecar.http.admin.usage import iso, single_params
from sidecar.http.auth import require_admin
from sidecar.http.envelope import ApiError, listed
from sidecar.services import Services


def routes(services: Services) -> list[Route]:
    async def listing(request: Request) -> JSONResponse:
        await require_admin(services, request)
        params = single_params(request.query_params, frozenset({"limit", "action"}))
        text = params.get("limit", "100")
        if not text.isdigit() or not 1 <= int(text) <= MAX_LISTED:
            raise ApiError(400, f"limit must be a whole number from 1 to {MAX_LISTED}")
        entries = await latest(
            services.store, int(text), params.get("action", ""), now=services.engine.clock()
        )
        result = [{**e, "at": iso(int(e["at"]))} for e in entries]
        return listed(result)

    return [Route("/v1/audit", listing, methods=["GET"])]
