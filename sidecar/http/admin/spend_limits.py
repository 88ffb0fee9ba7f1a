"""`/v1/spend-limits`: rules set at run time, stored beside the read-only rules of the file."""

from __future__ import annotations

from typing import Any

import structlog
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sidecar.budget.backfill import seed_rules
from sidecar.budget.runtime_rules import ACCOUNT_RULE, SPEND_LIMITS
from sidecar.config.loader import plain_message
from sidecar.config.models import SpendLimitConfig
from sidecar.config.ruleset import rules_from_config
from sidecar.http.auth import require_admin
from sidecar.http.envelope import ApiError, json_object, listed, ok
from sidecar.money import micros_to_usd, usd_to_micros
from sidecar.services import Services

log = structlog.get_logger("sidecar.admin")
MAX_RUNTIME_RULES = 200


def validate_rule(data: dict[str, Any]) -> dict[str, Any]:
    try:
        rule = SpendLimitConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            path = ".".join(
                str(p)
                for p in err["loc"]
                if not str(p).startswith("function-") and p not in ("token-count", "token-limits")
            )
            problems.append(f"{path or 'body'}: {plain_message(err['msg'])}")
        raise ApiError(400, "; ".join(problems)) from None
    if rule.name == ACCOUNT_RULE:
        raise ApiError(400, f"the name {ACCOUNT_RULE!r} is reserved for the account limit")
    return rule.public_doc()


def shown(rule: dict[str, Any], source: str) -> dict[str, Any]:
    """A rule as the API shows it: dollars kept as an exact decimal string, shown as a JSON
    number; a token or request rule shows only its own unit."""
    shown_rule = {
        k: v
        for k, v in rule.items()
        if k not in ("budget_usd", "tokens", "requests") or v is not None
    }
    if rule.get("budget_usd") is not None:
        shown_rule["budget_usd"] = micros_to_usd(usd_to_micros(rule["budget_usd"]))
    return {**shown_rule, "source": source}


def audited(rule: dict[str, Any] | None) -> dict[str, Any] | None:
    """A rule as the audit trail keeps it: as shown, without where it is kept."""
    if rule is None:
        return None
    return {k: v for k, v in shown(rule, "").items() if k != "source"}


def file_rules(services: Services) -> dict[str, dict[str, Any]]:
    return {r.name: shown(r.public_doc(), "file") for r in services.ruleset.config.spend_limits}


async def runtime_rules(services: Services) -> dict[str, dict[str, Any]]:
    now = services.engine.clock()
    docs = await services.store.list_docs(SPEND_LIMITS, now=now)
    return {d["name"]: shown(d, "runtime") for d in docs}


async def seed(services: Services, rule: dict[str, Any]) -> None:
    # Before the rule takes effect, so spend already made in its window counts.
    compiled = rules_from_config(SpendLimitConfig.model_validate(rule), source="runtime")
    await seed_rules(services.store, compiled, services.engine.clock())


def check_writable(services: Services, name: str) -> None:
    """409 when `name` is a rule from the config file: only runtime rules are written."""
    if name in file_rules(services):
        raise ApiError(409, f"{name!r} is defined in the config file (read-only)")


async def check_new(services: Services, name: str) -> None:
    """409 unless a runtime rule named `name` could be created now."""
    check_writable(services, name)
    existing = await runtime_rules(services)
    if len(existing) >= MAX_RUNTIME_RULES:
        raise ApiError(409, f"at most {MAX_RUNTIME_RULES} runtime spend limits")
    if name in existing:
        raise ApiError(409, f"a spend limit named {name!r} already exists")


async def add_limit(services: Services, admin: str, rule: dict[str, Any]) -> dict[str, Any]:
    """Create a validated runtime rule, audited; 409 when its name is taken."""
    await check_new(services, rule["name"])
    await seed(services, rule)
    now = services.engine.clock()
    if not await services.store.swap_doc(SPEND_LIMITS, rule["name"], None, rule, now=now):
        raise ApiError(409, f"a spend limit named {rule['name']!r} already exists")
    await services.runtime_rules.refresh()
    log.info("spend_limit_created", by=admin, name=rule["name"])
    await services.audit(admin, "spend_limit.create", rule["name"], None, audited(rule))
    return shown(rule, "runtime")


def routes(services: Services) -> list[Route]:
    async def listing(request: Request) -> JSONResponse:
        await require_admin(services, request)
        rules = [*file_rules(services).values(), *(await runtime_rules(services)).values()]
        return listed(rules)

    async def get_one(request: Request) -> JSONResponse:
        await require_admin(services, request)
        name = request.path_params["name"]
        rule = file_rules(services).get(name) or (await runtime_rules(services)).get(name)
        if rule is None:
            raise ApiError(404, f"no spend limit named {name!r}")
        return ok(rule)

    async def create(request: Request) -> JSONResponse:
        admin = await require_admin(services, request)
        rule = validate_rule(await json_object(request))
        return ok(await add_limit(services, admin, rule), status=201)

    async def editing(request: Request) -> tuple[str, float, str]:
        """The admin, the time, and the name in the path of a runtime rule to change."""
        admin = await require_admin(services, request)
        now = services.engine.clock()
        name = request.path_params["name"]
        check_writable(services, name)
        return admin, now, name

    async def replace(request: Request) -> JSONResponse:
        admin, now, name = await editing(request)
        data = await json_object(request)
        rule = validate_rule({**data, "name": data.get("name", name)})
        if rule["name"] != name:
            raise ApiError(400, "the name in the body must match the path")
        current = await services.store.get_doc(SPEND_LIMITS, name, now=now)
        if current is None:
            raise ApiError(404, f"no runtime spend limit named {name!r}")
        await seed(services, rule)
        if not await services.store.swap_doc(SPEND_LIMITS, name, current, rule, now=now):
            raise ApiError(409, "the spend limit changed meanwhile; try again")
        await services.runtime_rules.refresh()
        log.info("spend_limit_replaced", by=admin, name=name)
        await services.audit(admin, "spend_limit.update", name, audited(current), audited(rule))
        return ok(shown(rule, "runtime"))

    async def delete(request: Request) -> JSONResponse:
        admin, now, name = await editing(request)
        current = await services.store.get_doc(SPEND_LIMITS, name, now=now)
        if current is None or not await services.store.swap_doc(
            SPEND_LIMITS, name, current, None, now=now
        ):
            raise ApiError(404, f"no runtime spend limit named {name!r}")
        await services.runtime_rules.refresh()
        log.info("spend_limit_deleted", by=admin, name=name)
        await services.audit(admin, "spend_limit.delete", name, audited(current), None)
        return ok({"name": name, "deleted": True})

    return [
        Route("/v1/spend-limits", listing, methods=["GET"]),
        Route("/v1/spend-limits", create, methods=["POST"]),
        Route("/v1/spend-limits/{name}", get_one, methods=["GET"]),
        Route("/v1/spend-limits/{name}", replace, methods=["PUT"]),
        Route("/v1/spend-limits/{name}", delete, methods=["DELETE"]),
    ]
