"""The Cloudflare-style response envelope, and reading JSON request bodies safely."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from sidecar import untrusted_json

MAX_JSON_BODY = 64 * 1024


class ApiError(Exception):
    """An admin API failure: rendered as the envelope with `success: false`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.code = code if code is not None else status * 10
        self.headers = headers or {}
        super().__init__(message)


def ok(result: Any, status: int = 200, result_info: dict[str, Any] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"success": True, "errors": [], "messages": [], "result": result}
    if result_info is not None:
        body["result_info"] = result_info
    return JSONResponse(body, status_code=status)


def one_page(items: list[Any], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`result_info` of a listing answered whole, on one page."""
    return {
        "page": 1,
        "per_page": len(items),
        "total_count": len(items),
        "has_more": False,
        **(extra or {}),
    }


def listed(items: list[Any]) -> JSONResponse:
    return ok(items, result_info=one_page(items))


def fail(
    status: int, message: str, code: int | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {
            "success": False,
            "errors": [{"code": code or status * 10, "message": message}],
            "messages": [],
            "result": None,
        },
        status_code=status,
        headers=headers,
    )


async def json_object(request: Request) -> dict[str, Any]:
    """The request's JSON object body, or an ApiError naming what is wrong with it."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_JSON_BODY):
        raise ApiError(413, f"request body larger than {MAX_JSON_BODY} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_JSON_BODY:
            raise ApiError(413, f"request body larger than {MAX_JSON_BODY} bytes")
    if not raw.strip():
        raise ApiError(400, "request body must be a JSON object")
    try:
        data = untrusted_json.loads(raw, unique_keys=True)
    except untrusted_json.TooDeep:
        raise ApiError(400, "request body is nested too deeply") from None
    except untrusted_json.DuplicateKey as err:
        raise ApiError(400, f"request body: {err}") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def reject_unknown(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")
