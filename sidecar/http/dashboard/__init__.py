"""`GET /dashboard`: spend over time, top spenders, budgets and recent refusals, for admins.

A browser reaches it through Access, which adds the `CF_Authorization` cookie: a person in
one of `admin.groups` sees the page; the admin bearer token works too (scripts, tests).
Query: `window=hour|day` (default day), `start`, `end` — the same parameters and defaults
as `GET /v1/usage`, read by the same parser, so the page covers exactly the API's range.
"""

from __future__ import annotations

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from sidecar.http.admin.usage import parse_usage_query
from sidecar.http.auth import require_admin
from sidecar.http.dashboard.charts import esc
from sidecar.http.dashboard.data import gather
from sidecar.http.dashboard.page import render
from sidecar.http.envelope import ApiError
from sidecar.services import Services

PARAMS = frozenset({"window", "start", "end"})
# No script runs and nothing loads from elsewhere; the page cannot be framed.
HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "img-src data:; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'none'",
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def _error_page(status: int, message: str) -> HTMLResponse:
    hint = {401: "Sign in through Access (or send the admin bearer token).",
            403: "Your identity is not in one of the admin groups."}.get(status, "")
    body = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<title>{status}</title><link rel="icon" href="data:,"></head>'
            f'<body style="font-family:system-ui,sans-serif;padding:2em">'
            f"<h1>{status}</h1><p>{esc(message)}</p><p>{esc(hint)}</p></body></html>")
    return HTMLResponse(body, status_code=status, headers=HEADERS)


def routes(services: Services) -> list[Route]:
    async def dashboard(request: Request) -> HTMLResponse:
        try:
            await require_admin(services, request)
            unknown = sorted(set(request.query_params) - PARAMS)
            if unknown:
                raise ApiError(400, f"unknown query parameter(s): {', '.join(unknown)}; "
                                    f"expected {', '.join(sorted(PARAMS))}")
            items = request.query_params.multi_items()
            if "window" not in request.query_params:
                items.append(("window", "day"))
            query = parse_usage_query(QueryParams(items), int(services.engine.clock()))
        except ApiError as exc:
            return _error_page(exc.status, exc.message)
        assert query.window is not None
        data = await gather(services.engine, query.window, query.start, query.end)
        return HTMLResponse(render(data), headers=HEADERS)

    return [Route("/dashboard", dashboard, methods=["GET"])]
