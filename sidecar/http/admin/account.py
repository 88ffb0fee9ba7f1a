"""Account-wide limits in the seed APIs' shapes: the AI Gateway spending limit
(`/accounts/{id}/ai-gateway/billing/spending-limit`) and the spending caps
(`/v1/organizations/billing/spending-caps`). Amounts are integer cents."""

from __future__ import annotations

from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sidecar.budget.runtime_rules import ACCOUNT_LIMIT, ACCOUNT_RULE, SPENDING_CAPS
from sidecar.http.auth import require_admin
from sidecar.http.envelope import ApiError, json_object, ok, reject_unknown
from sidecar.money import MICROS_PER_CENT, micros_to_cents
from sidecar.policy.windows import FixedWindow
from sidecar.services import Services
from sidecar.store.budget_types import BucketView

log = structlog.get_logger("sidecar.admin")
MAX_CENTS = 10**12  # $10 billion: beyond any real budget, well inside exact integer range


def _cents(data: dict[str, Any], key: str, minimum: int, nullable: bool) -> int | None:
    value = data[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(
            400, f"{key} must be an integer number of cents" + (" or null" if nullable else "")
        )
    if value < minimum:
        raise ApiError(400, f"{key} must be at least {minimum} cents")
    if value > MAX_CENTS:
        raise ApiError(400, f"{key} must be at most {MAX_CENTS} cents")
    return value


def _choice(data: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = data.get(key)
    if value not in choices:
        raise ApiError(400, f"{key} must be one of: {', '.join(choices)}")
    return str(value)


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data[key]
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false")
    return value


def _thresholds(value: Any) -> list[int]:
    if (
        not isinstance(value, list)
        or len(value) > 20
        or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= 100 for t in value)
    ):
        raise ApiError(
            400, "spending_alert_thresholds must be a list of up to 20 integers from 0 to 100"
        )
    return sorted(set(value))


def routes(services: Services) -> list[Route]:
    def account(request: Request) -> str:
        account_id = request.path_params["account_id"]
        if account_id != services.ruleset.config.account_id:
            raise ApiError(404, f"unknown account {account_id!r}", code=7003)
        return str(account_id)

    async def get_limit(request: Request) -> JSONResponse:
        await require_admin(services, request)
        now = services.engine.clock()
        doc = await services.store.get_doc(ACCOUNT_LIMIT, account(request), now=now)
        if doc is None:
            return ok({"config": None, "enabled": False})
        return ok(
            {"config": {k: doc[k] for k in ("amount", "duration", "strategy")}, "enabled": True}
        )

    async def set_limit(request: Request) -> JSONResponse:
        admin = await require_admin(services, request)
        now = services.engine.clock()
        account_id = account(request)
        data = await json_object(request)
        reject_unknown(data, {"amount", "duration", "strategy"})
        for key in ("amount", "duration", "strategy"):
            if key not in data:
                raise ApiError(400, f"{key} is required")
        doc = {
            "amount": _cents(data, "amount", 100, nullable=False),
            "duration": _choice(data, "duration", ("daily", "weekly", "monthly")),
            "strategy": _choice(data, "strategy", ("fixed", "sliding")),
        }
        before = await services.store.get_doc(ACCOUNT_LIMIT, account_id, now=now)
        await services.store.put_doc(ACCOUNT_LIMIT, account_id, doc, now=now)
        await services.runtime_rules.refresh()
        log.info("account_spending_limit_set", by=admin, **doc)
        await services.audit(admin, "account_limit.set", account_id, before, doc)
        return ok({"config": doc, "enabled": True})

    async def delete_limit(request: Request) -> JSONResponse:
        admin = await require_admin(services, request)
        now = services.engine.clock()
        account_id = account(request)
        before = await services.store.get_doc(ACCOUNT_LIMIT, account_id, now=now)
        await services.store.delete_doc(ACCOUNT_LIMIT, account_id)
        await services.runtime_rules.refresh()
        log.info("account_spending_limit_removed", by=admin)
        if before is not None:
            await services.audit(admin, "account_limit.delete", account_id, before, None)
        return ok({"config": None, "enabled": False})

    async def caps_view(doc: dict[str, Any]) -> dict[str, Any]:
        window = FixedWindow("monthly", "UTC")
        now = services.engine.clock()
        view = BucketView(
            f"{ACCOUNT_RULE}|fixed:monthly:UTC",
            window.slot(now),
            window.since(now),
            window.ttl_seconds(),
            0,
            enforce=False,
        )
        state = (await services.store.bucket_states([view], now))[0]
        spent_cents = micros_to_cents(state.spent)
        budget = doc.get("monthly_spending_budget")
        cap = doc.get("hard_spending_cap")
        thresholds = doc.get("spending_alert_thresholds", [])
        percent = None if not budget else round(state.spent * 100 / (budget * MICROS_PER_CENT), 2)
        return {
            "current_spending": spent_cents,
            "current_spending_usd": spent_cents / 100,
            "monthly_spending_budget": budget,
            "monthly_spending_budget_usd": None if budget is None else budget / 100,
            "spending_alert_thresholds": thresholds,
            "spending_alerts_enabled": doc.get("spending_alerts_enabled", False),
            "hard_spending_cap": cap,
            "hard_spending_cap_usd": None if cap is None else cap / 100,
            "hard_cap_enabled": doc.get("hard_cap_enabled", False),
            "percentage_used": percent,
            "alert_thresholds_triggered": [
                t for t in thresholds if percent is not None and percent >= t
            ],
        }

    async def get_caps(request: Request) -> JSONResponse:
        await require_admin(services, request)
        now = services.engine.clock()
        account_id = services.ruleset.config.account_id
        doc = await services.store.get_doc(SPENDING_CAPS, account_id, now=now) or {}
        return ok(await caps_view(doc))

    async def set_caps(request: Request) -> JSONResponse:
        admin = await require_admin(services, request)
        now = services.engine.clock()
        account_id = services.ruleset.config.account_id
        data = await json_object(request)
        fields = {
            "monthly_spending_budget",
            "spending_alert_thresholds",
            "spending_alerts_enabled",
            "hard_spending_cap",
            "hard_cap_enabled",
        }
        reject_unknown(data, fields)
        if not data:
            raise ApiError(400, f"nothing to update; fields: {', '.join(sorted(fields))}")
        current = await services.store.get_doc(SPENDING_CAPS, account_id, now=now) or {}
        update: dict[str, Any] = {}
        for key in ("monthly_spending_budget", "hard_spending_cap"):
            if key in data:
                update[key] = _cents(data, key, 0, nullable=True)
        for key in ("spending_alerts_enabled", "hard_cap_enabled"):
            if key in data:
                update[key] = _bool(data, key)
        if "spending_alert_thresholds" in data:
            update["spending_alert_thresholds"] = _thresholds(data["spending_alert_thresholds"])
        doc = {
            "spending_alert_thresholds": [50, 75, 90, 100],
            "spending_alerts_enabled": True,
            "hard_cap_enabled": False,
            "monthly_spending_budget": None,
            "hard_spending_cap": None,
            **current,
            **update,
        }
        await services.store.put_doc(SPENDING_CAPS, account_id, doc, now=now)
        await services.runtime_rules.refresh()
        log.info("spending_caps_set", by=admin, **update)
        await services.audit(admin, "spending_caps.set", account_id, current or None, doc)
        return ok(await caps_view(doc))

    base = "/accounts/{account_id}/ai-gateway/billing/spending-limit"
    return [
        Route(base, get_limit, methods=["GET"]),
        Route(base, set_limit, methods=["POST", "PUT"]),
        Route(base, delete_limit, methods=["DELETE"]),
        Route("/v1/organizations/billing/spending-caps", get_caps, methods=["GET"]),
        Route("/v1/organizations/billing/spending-caps", set_caps, methods=["POST", "PUT"]),
    ]
