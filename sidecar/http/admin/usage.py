"""Usage APIs over the ledger: Cloudflare's `usage-history`, the grouped `/v1/usage` (admin)
and `/v1/usage/me` (any authenticated caller, their own rows only).

Both read hourly ledger rows from the store and aggregate them with
`sidecar.metering.ledger`; money stays in integer µUSD until the JSON is written.
Query strings are validated strictly (unknown parameters included) so that a typo gets a
400 naming it instead of a silently different report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sidecar.http.auth import caller, require_admin
from sidecar.http.envelope import ApiError, ok, one_page
from sidecar.metering.ledger import (
    WINDOWS,
    UsageRow,
    Window,
    align_down,
    align_up,
    group_usage,
    hour_range,
    in_range,
    of_user,
    parse_group_by,
    usage_history,
)
from sidecar.money import micros_to_usd
from sidecar.services import Services

DAY = 86400
# Longest range one call may cover: a little over a year, enough for year-on-year views
# while bounding how many ledger rows one request reads.
MAX_RANGE_SECONDS = 400 * DAY
# 9999-12-31T00:00:00Z: a range end rounded up to a whole day must still be a year-9999 time,
# the last that ISO 8601 (and Python's datetime) can show.
MAX_INSTANT = 253402214400
# Ranges used when the caller gives no start: what each granularity is typically viewed over.
DEFAULT_SPAN: dict[Window | None, int] = {"hour": 2 * DAY, "day": 30 * DAY, None: 30 * DAY}
HISTORY_PARAMS = frozenset({"value_grouping_window", "start_time", "end_time"})
USAGE_PARAMS = frozenset({"group_by", "window", "start", "end"})


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def single_params(query: QueryParams, allowed: frozenset[str]) -> dict[str, str]:
    """The query as a dict; 400 on unknown or repeated parameters."""
    keys = list(query.keys())
    unknown = sorted(set(keys) - allowed)
    if unknown:
        raise ApiError(
            400,
            f"unknown query parameter(s): {', '.join(unknown)}; "
            f"expected {', '.join(sorted(allowed))}",
        )
    repeated = sorted({k for k in keys if len(query.getlist(k)) > 1})
    if repeated:
        raise ApiError(400, f"query parameter(s) given more than once: {', '.join(repeated)}")
    return {k: query[k] for k in keys}


def parse_window(value: str | None, name: str, required: bool) -> Window | None:
    if value is None or value == "":
        if required:
            raise ApiError(400, f"{name} is required: one of {', '.join(WINDOWS)}")
        return None
    for window in WINDOWS:
        if value == window:
            return window
    raise ApiError(400, f"{name} must be one of {', '.join(WINDOWS)}, not {value!r}")


def parse_number(value: str, name: str) -> Decimal:
    try:
        number = Decimal(value.strip())
    except InvalidOperation:
        raise ApiError(400, f"{name} must be a number, not {value!r}") from None
    if not number.is_finite() or number < 0:
        raise ApiError(400, f"{name} must be a non-negative number, not {value!r}")
    return number


def parse_millis(value: str, name: str) -> int:
    """Cloudflare's Unix time in milliseconds (fractions allowed) → whole Unix seconds."""
    return int(parse_number(value, name) / 1000)


def parse_instant(value: str, name: str) -> int:
    """Epoch seconds or ISO 8601 (a date, or a time; UTC unless it says otherwise)."""
    text = value.strip()
    if text and (text[0].isdigit() and text.replace(".", "", 1).isdigit()):
        return int(parse_number(text, name))
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(
            400, f"{name} must be epoch seconds or an ISO 8601 time, not {value!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    seconds = parsed.timestamp()
    if seconds < 0:
        raise ApiError(400, f"{name} must not be before 1970")
    return math.floor(seconds)


def resolve_range(
    params: Mapping[str, str],
    names: tuple[str, str],
    parse: Callable[[str, str], int],
    now: int,
    window: Window | None,
) -> tuple[int, int]:
    """[start, end) from the optional parameters `names` (read by `parse`), with defaults
    (end: now; start: the window's default span before end)."""
    given_start, given_end = (
        parse(params[name], name) if name in params else None for name in names
    )
    end = now if given_end is None else given_end
    start = end - DEFAULT_SPAN[window] if given_start is None else given_start
    start = max(start, 0)
    if end > MAX_INSTANT:
        raise ApiError(400, f"{names[1]} is after the year 9999")
    if start > end:
        raise ApiError(400, f"{names[0]} must not be after {names[1]}")
    if end - start > MAX_RANGE_SECONDS:
        raise ApiError(
            400,
            f"the range from {names[0]} to {names[1]} is longer than "
            f"{MAX_RANGE_SECONDS // DAY} days",
        )
    return start, end


@dataclass(frozen=True)
class HistoryQuery:
    window: Window
    start: int  # aligned down to the window
    end: int  # aligned up to the window


def parse_history_query(query: QueryParams, now: int) -> HistoryQuery:
    params = single_params(query, HISTORY_PARAMS)
    window = parse_window(
        params.get("value_grouping_window"), "value_grouping_window", required=True
    )
    assert window is not None
    first, last = resolve_range(params, ("start_time", "end_time"), parse_millis, now, window)
    return HistoryQuery(window, align_down(first, window), align_up(last, window))


@dataclass(frozen=True)
class UsageQuery:
    group_by: tuple[str, ...]
    window: Window | None
    start: int
    end: int


def parse_usage_query(query: QueryParams, now: int) -> UsageQuery:
    params = single_params(query, USAGE_PARAMS)
    try:
        group_by = parse_group_by(params.get("group_by", ""))
    except ValueError as exc:
        raise ApiError(400, f"group_by: {exc}") from None
    window = parse_window(params.get("window"), "window", required=False)
    first, last = resolve_range(params, ("start", "end"), parse_instant, now, window)
    return UsageQuery(group_by, window, first, last)


def usage_json(row: UsageRow) -> dict[str, Any]:
    out: dict[str, Any] = dict(row.keys)
    if row.window_start is not None:
        out["window_start"] = iso(row.window_start)
    out.update(
        cost_usd=micros_to_usd(row.totals.cost),
        requests=row.totals.requests,
        input_tokens=row.totals.input_tokens,
        output_tokens=row.totals.output_tokens,
        errors=row.totals.errors,
    )
    return out


def routes(services: Services) -> list[Route]:
    def now() -> int:
        return int(services.engine.clock())

    async def history(request: Request) -> JSONResponse:
        await require_admin(services, request)
        account = request.path_params["account_id"]
        if account != services.ruleset.config.account_id:
            raise ApiError(404, f"unknown account {account!r}")
        q = parse_history_query(request.query_params, now())
        rows = in_range(await services.store.ledger_rows(q.start, q.end), q.start, q.end)
        buckets = [
            {
                "id": iso(b.start),
                "aggregated_value": micros_to_usd(b.cost),
                "start_time": b.start * 1000,
                "end_time": b.end * 1000,
            }
            for b in usage_history(rows, q.window)
        ]
        return ok({"history": buckets}, result_info=one_page(buckets))

    async def usage(request: Request) -> JSONResponse:
        await require_admin(services, request)
        return await report(request, None)

    async def usage_me(request: Request) -> JSONResponse:
        identity = await caller(services, request)
        return await report(request, identity.user)

    async def report(request: Request, user: str | None) -> JSONResponse:
        q = parse_usage_query(request.query_params, now())
        first, last = hour_range(q.start, q.end)
        rows = in_range(await services.store.ledger_rows(first, last), first, last)
        if user is not None:
            rows = of_user(rows, user)
        result = [usage_json(r) for r in group_usage(rows, q.group_by, q.window)]
        return ok(result, result_info=one_page(result, {"start": iso(first), "end": iso(last)}))

    return [
        Route("/accounts/{account_id}/ai-gateway/billing/usage-history", history, methods=["GET"]),
        Route("/v1/usage", usage, methods=["GET"]),
        Route("/v1/usage/me", usage_me, methods=["GET"]),
    ]
