"""`/v1/budgets/me` for any caller, and `/v1/simulate` (admin): budgets without charging."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sidecar.budget.explain import budgets_for, simulate
from sidecar.http.auth import caller, require_admin
from sidecar.http.envelope import ApiError, json_object, ok, reject_unknown
from sidecar.model import Identity
from sidecar.policy.request import BadRequest, parse_metadata
from sidecar.services import Services

_TEXT = re.compile(r"^[^\x00-\x1f]{0,256}$")


def _text(data: dict[str, Any], key: str, default: str = "") -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or not _TEXT.match(value):
        raise ApiError(400, f"{key} must be a string of at most 256 characters")
    return value


def _identity(data: Any) -> Identity:
    if not isinstance(data, dict):
        raise ApiError(400, "identity must be an object")
    reject_unknown(data, {"email", "groups", "kind", "token_name", "subject"})
    kind = _text(data, "kind", "user")
    if kind not in ("user", "service", "cli"):
        raise ApiError(400, "identity.kind must be user, service or cli")
    groups = data.get("groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise ApiError(400, "identity.groups must be a list of strings")
    email = _text(data, "email")
    token_name = _text(data, "token_name")
    if not (email or token_name):
        raise ApiError(400, "identity needs an email or a token_name")
    subject = _text(data, "subject") or email or token_name
    return Identity(
        kind=kind,  # type: ignore[arg-type]
        subject=subject,
        email=email,
        groups=tuple(groups),
        token_name=token_name,
    )


def routes(services: Services) -> list[Route]:
    async def me(request: Request) -> JSONResponse:
        identity = await caller(services, request)
        model = request.query_params.get("model", "")
        provider = request.query_params.get("provider", "")
        if len(model) > 256 or len(provider) > 64:
            raise ApiError(400, "model or provider too long")
        rows = await budgets_for(services.engine, identity, model, provider)
        return ok(rows)

    async def simulate_route(request: Request) -> JSONResponse:
        admin = await require_admin(services, request)
        data = await json_object(request)
        reject_unknown(data, {"identity", "model", "provider", "metadata", "body", "max_tokens"})
        model = _text(data, "model")
        if not model:
            raise ApiError(400, "model is required")
        if "identity" in data:
            identity = _identity(data["identity"])
        elif admin == "admin-token":
            raise ApiError(400, "identity is required when calling with the admin token")
        else:
            identity = await caller(services, request)
        rs = services.ruleset
        provider_id = _text(data, "provider") or (rs.providers[0].id if rs.providers else "")
        provider = rs.provider_by_id.get(provider_id)
        if provider is None:
            raise ApiError(400, f"unknown provider {provider_id!r}")
        metadata_raw = data.get("metadata", {})
        if not isinstance(metadata_raw, dict):
            raise ApiError(400, "metadata must be an object")
        try:
            metadata = parse_metadata({"cf-aig-metadata": json.dumps(metadata_raw)})
        except BadRequest as exc:
            raise ApiError(400, str(exc)) from None
        body = data.get("body", {"model": model})
        if not isinstance(body, dict):
            raise ApiError(400, "body must be an object (the LLM request body)")
        if "max_tokens" in data:
            tokens = data["max_tokens"]
            if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 < tokens <= 10**7:
                raise ApiError(400, "max_tokens must be a positive integer")
            body = {**body, "max_tokens": tokens}
        try:
            return ok(await simulate(services.engine, identity, model, provider, metadata, body))
        except BadRequest as exc:  # an output limit or answer count no Check would take
            raise ApiError(400, str(exc)) from None

    return [
        Route("/v1/budgets/me", me, methods=["GET"]),
        Route("/v1/simulate", simulate_route, methods=["POST"]),
    ]
