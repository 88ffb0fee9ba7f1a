"""The Starlette application: routes from each module, one error renderer."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sidecar.http import authz, budgets, dashboard, device
from sidecar.http.admin import (
    account,
    audit,
    cli_sessions,
    service_tokens,
    spend_limits,
    usage,
)
from sidecar.http.envelope import ApiError, fail
from sidecar.metrics import exposition
from sidecar.services import Services
from sidecar.store.base import StoreUnavailable


def create_app(services: Services) -> Starlette:
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        store_ok = await services.store.ping()
        ready = store_ok and not services.draining
        rs = services.ruleset
        return JSONResponse(
            {
                "ready": ready,
                "store": "ok" if store_ok else "unavailable",
                "config_version": rs.version,
                "config_loaded_at": rs.loaded_at,
                "config_last_error": services.holder.last_error,
                "draining": services.draining,
            },
            status_code=200 if ready else 503,
        )

    async def metrics(request: Request) -> Response:
        return Response(exposition(), media_type=CONTENT_TYPE_LATEST)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return fail(exc.status, exc.message, exc.code, exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return fail(exc.status_code, str(exc.detail))

    async def store_down(request: Request, exc: Exception) -> Response:
        # A store that dropped away mid-request (a Redis restart, say) is a retryable 503,
        # in the envelope like every other answer, never a bare 500.
        return fail(
            503,
            f"the budget store is unavailable; try again shortly ({exc})",
            headers={"retry-after": "1"},
        )

    route_list: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        *service_tokens.routes(services),
        *account.routes(services),
        *spend_limits.routes(services),
        *budgets.routes(services),
        *usage.routes(services),
        *audit.routes(services),
        *cli_sessions.routes(services),
        *device.routes(services),
        *authz.routes(services),
        *dashboard.routes(services),
    ]
    app = Starlette(
        routes=route_list,
        # Status-code keys catch the router's own 404 and 405 too, so every answer, even to
        # a path that matches nothing, is the JSON envelope.
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            404: http_error,
            405: http_error,
            StoreUnavailable: store_down,
        },
    )
    # An API answers the path it was given; a redirect to a slash variant is never right.
    app.router.redirect_slashes = False
    return app
