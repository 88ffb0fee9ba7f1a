"""`GET /dashboard`: spend over time, top spenders, budgets, recent refusals and the latest
admin writes, for admins; `GET /dashboard.csv`: the spend it shows, as CSV.

A browser reaches it through Access, which adds the `CF_Authorization` cookie: a person in
one of `admin.groups` sees the page; the admin bearer token works too (scripts, tests).
Without Access, `sidecar dashboard` gets a one-time link (`POST /v1/dashboard/link`) whose
`/dashboard/open` sets a short-lived session cookie for these two read-only pages.
Query: `window=hour|day` (default day), `start`, `end` — the same parameters and defaults
as `GET /v1/usage`, read by the same parser, so the page covers exactly the API's range —
and the filters `user`, `group`, `model` (exact values).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from sidecar.engine import Engine
from sidecar.http.admin.usage import UsageQuery, parse_usage_query
from sidecar.http.auth import require_admin
from sidecar.http.dashboard.charts import esc
from sidecar.http.dashboard.data import export_csv, gather
from sidecar.http.dashboard.page import render
from sidecar.http.dashboard.session import (
    COOKIE,
    LINK_SECONDS,
    SESSION_SECONDS,
    DashboardSessions,
)
from sidecar.http.envelope import ApiError, ok
from sidecar.metering.ledger import Window
from sidecar.services import Services

log = structlog.get_logger("sidecar.dashboard")

FILTERS = ("user", "group", "model")
T = TypeVar("T")
PARAMS = frozenset({"window", "start", "end", *FILTERS})
# No script runs and nothing loads from elsewhere; the page cannot be framed.
HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src data:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'",
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def _error_page(status: int, message: str) -> HTMLResponse:
    hint = {
        401: "Sign in through Access (or send the admin bearer token).",
        403: "Your identity is not in one of the admin groups.",
    }.get(status, "")
    body = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<title>{status}</title><link rel="icon" href="data:,"></head>'
        f'<body style="font-family:system-ui,sans-serif;padding:2em">'
        f"<h1>{status}</h1><p>{esc(message)}</p><p>{esc(hint)}</p></body></html>"
    )
    return HTMLResponse(body, status_code=status, headers=HEADERS)


def routes(services: Services) -> list[Route]:
    sessions = DashboardSessions(services.store)

    def now() -> float:
        return services.engine.clock()

    async def viewer(request: Request) -> str:
        cookie = request.cookies.get(COOKIE, "")
        if cookie and "authorization" not in request.headers:
            who = await sessions.who(cookie, now())
            if who is not None:
                return who
        return await require_admin(services, request)

    async def query_of(request: Request) -> tuple[UsageQuery, dict[str, str]]:
        await viewer(request)
        unknown = sorted(set(request.query_params) - PARAMS)
        if unknown:
            raise ApiError(
                400,
                f"unknown query parameter(s): {', '.join(unknown)}; "
                f"expected {', '.join(sorted(PARAMS))}",
            )
        filters = {k: request.query_params[k] for k in FILTERS if request.query_params.get(k)}
        if any(len(v) > 256 for v in filters.values()):
            raise ApiError(400, "filter values must be at most 256 characters")
        items = [(k, v) for k, v in request.query_params.multi_items() if k not in FILTERS]
        if "window" not in request.query_params:
            items.append(("window", "day"))
        return parse_usage_query(QueryParams(items), int(now())), filters

    def view(
        build: Callable[[Engine, Window, int, int, dict[str, str]], Awaitable[T]],
        respond: Callable[[T], Response],
    ) -> Callable[[Request], Awaitable[Response]]:
        """A page over the queried range: `build` reads it, `respond` answers with it; a
        bad query or a caller who may not see it gets an error page."""

        async def endpoint(request: Request) -> Response:
            try:
                query, filters = await query_of(request)
            except ApiError as exc:
                return _error_page(exc.status, exc.message)
            assert query.window is not None
            return respond(
                await build(services.engine, query.window, query.start, query.end, filters)
            )

        return endpoint

    dashboard = view(gather, lambda data: HTMLResponse(render(data), headers=HEADERS))
    csv_export = view(
        export_csv,
        lambda text: Response(
            text,
            media_type="text/csv; charset=utf-8",
            headers={**HEADERS, "content-disposition": 'attachment; filename="llm-spend.csv"'},
        ),
    )

    async def new_link(request: Request) -> JSONResponse:
        admin = await require_admin(services, request)
        code = await sessions.new_link(admin, now())
        public = services.ruleset.config.identity.device_login.public_url
        base = (public or str(request.base_url)).rstrip("/")
        log.info("dashboard_link_issued", by=admin)
        return ok({"url": f"{base}/dashboard/open?code={code}", "expires_in": LINK_SECONDS})

    async def open_link(request: Request) -> Response:
        opened = await sessions.open(request.query_params.get("code", ""), now())
        if opened is None:
            return _error_page(
                403,
                "This dashboard link is unknown, already used or expired. "
                "Run `sidecar dashboard` for a new one.",
            )
        log.info("dashboard_session_opened", by=opened.who)
        response = RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
        response.set_cookie(
            COOKIE,
            opened.cookie,
            max_age=SESSION_SECONDS,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    return [
        Route("/dashboard", dashboard, methods=["GET"]),
        Route("/dashboard.csv", csv_export, methods=["GET"]),
        Route("/dashboard/open", open_link, methods=["GET"]),
        Route("/v1/dashboard/link", new_link, methods=["POST"]),
    ]
