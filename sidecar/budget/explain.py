"""Read-only views of budgets: the buckets that apply to someone, and a dry-run decision
(`/v1/simulate`) that follows exactly the precedence of a real check without charging."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sidecar.config.ruleset import Provider
from sidecar.engine import (
    Engine,
    Plan,
    Planned,
    candidate_context,
    candidates,
    context,
    merge,
    model_allowed,
    plan,
)
from sidecar.model import Identity
from sidecar.money import micros_to_usd
from sidecar.policy.rules import Rule
from sidecar.pricing import estimate_input_tokens, estimate_micros, requested_output_tokens
from sidecar.store.budget_types import BucketState

# Without a model, rules that look at these dimensions cannot be placed in a bucket.
_REQUEST_DIMENSIONS = ("model", "provider")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def bucket_view(planned: Planned, state: BucketState, now: float) -> dict[str, Any]:
    rule = planned.rule
    return {
        "rule": rule.name,
        "bucket": planned.bucket_label,
        "action": rule.action,
        "source": rule.source,
        "window": rule.window_label,
        "limit": micros_to_usd(rule.limit),
        "spent": micros_to_usd(state.spent),
        "reserved": micros_to_usd(state.reserved),
        "remaining": micros_to_usd(max(0, rule.limit - state.spent - state.reserved)),
        "resets_at": _iso(rule.window.resets_at(now)),
    }


def _visible(rule: Rule, with_model: bool) -> bool:
    if rule.name == "account" and rule.action == "monitor" and rule.limit == 0:
        return False  # always-on tracking, not a budget anyone set
    if with_model:
        return True
    dims = {d for d, _ in rule.filters} | set(rule.split)
    return not any(d in dims or d.startswith("metadata.") for d in _REQUEST_DIMENSIONS) and \
        not any(d.startswith("metadata.") for d in dims)


async def budgets_for(engine: Engine, identity: Identity, model: str = "",
                      provider: str = "") -> list[dict[str, Any]]:
    rs = engine.holder.current
    now = engine.clock()
    rules = [r for r in engine.rules(rs) if _visible(r, bool(model))]
    known = rs.provider_by_id.get(provider)
    canonical = rs.prices.canonical(known.pricing_id if known else provider, model) \
        if model else ""
    budget = merge(plan(rules, context(identity, canonical, provider, {},
                                       requested=model.strip().lower()), now))
    states = await engine.store.bucket_states(list(budget.views), now)
    return [bucket_view(p, budget.state(p, states), now) for p in budget.planned]


async def simulate(engine: Engine, identity: Identity, model: str, provider: Provider,
                   metadata: Mapping[str, str], body: Mapping[str, Any]) -> dict[str, Any]:
    rs = engine.holder.current
    now = engine.clock()
    steps: list[dict[str, Any]] = []
    outcome: dict[str, Any] = {"decision": "deny", "status": 429, "model": model}
    for index, cand in enumerate(candidates(rs, model, provider)):
        cand_model, cand_provider = cand.model, cand.provider
        entry: dict[str, Any] = {"model": cand_model, "canonical": cand.canonical,
                                 "provider": cand_provider.id}
        steps.append(entry)
        if not model_allowed(rs, identity, cand):
            entry["result"] = "model_not_allowed"
            if index == 0:
                return {"decision": "deny", "status": 403, "reason": "model_not_allowed",
                        "model": model, "steps": steps}
            continue
        price = rs.prices.price(cand_provider.pricing_id, cand_model)
        if price is None:
            entry["result"] = "unpriced_model"
            if index == 0:
                return {"decision": "deny", "status": 403, "reason": "unpriced_model",
                        "model": model, "steps": steps}
            continue
        input_tokens = estimate_input_tokens(body)
        output_tokens = requested_output_tokens(body, rs.default_max_output_tokens)
        estimate = estimate_micros(price, input_tokens, output_tokens)
        entry.update(estimate_usd=micros_to_usd(estimate), input_tokens=input_tokens,
                     output_tokens=output_tokens, price_source=price.source)
        budget = merge(plan(engine.rules(rs), candidate_context(identity, cand, metadata),
                            now))
        states = await engine.store.bucket_states(list(budget.views), now)
        entry["buckets"] = _with_fit(budget, states, estimate, now)
        full = [b for b in entry["buckets"] if not b["fits"] and b["action"] != "monitor"]
        if any(b["action"] == "block" for b in full):
            entry["result"] = "blocked"
            return {"decision": "deny", "status": 429, "reason": "spend_limit_exceeded",
                    "model": model, "steps": steps}
        if full:
            entry["result"] = "fallback_rule_full"
            continue
        entry["result"] = "admitted"
        decision = "fallback" if index else "allow"
        return {"decision": decision, "status": 200, "reason": "ok" if not index else "fallback",
                "model": cand_model, "steps": steps}
    outcome.update(reason="spend_limit_exceeded", steps=steps)
    return outcome


def _with_fit(budget: Plan, states: Sequence[BucketState], estimate: int,
              now: float) -> list[dict[str, Any]]:
    out = []
    for planned in budget.planned:
        if not _visible(planned.rule, True):
            continue
        state = budget.state(planned, states)
        view = bucket_view(planned, state, now)
        view["fits"] = state.spent + state.reserved + estimate <= planned.rule.limit
        out.append(view)
    return out
