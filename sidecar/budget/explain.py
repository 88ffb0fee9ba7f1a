"""Read-only views of budgets: the buckets that apply to someone, and a dry-run decision
(`/v1/simulate`) that follows exactly the precedence of a real check without charging."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sidecar.admission.candidates import candidate_context, candidates, model_allowed
from sidecar.admission.estimate import priced, requested_geo, requested_tokens
from sidecar.admission.fit import fits, room
from sidecar.admission.plan import Plan, Planned, context, merge, plan
from sidecar.config.ruleset import Provider, RuleSet
from sidecar.engine import Engine
from sidecar.metering.ledger import hour_range, in_range, of_user
from sidecar.model import Identity
from sidecar.money import micros_to_usd
from sidecar.policy.rules import Context, Rule, in_unit, literal_values
from sidecar.store.budget_types import AdmissionMode, BucketState, LedgerRow, measured

# Rules that look at these dimensions have a bucket per model (or provider) a request names.
_REQUEST_DIMENSIONS = ("model", "provider")
# How far back spend is looked for when a rule's window is longer (rare).
MAX_LOOKBACK_SECONDS = 400 * 86_400


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def bucket_view(planned: Planned, state: BucketState, now: float) -> dict[str, Any]:
    """One bucket with the 429 body's keys; amounts in the rule's `unit` (USD as numbers,
    tokens and requests as whole numbers)."""
    rule = planned.rule
    unit = rule.unit
    view = {
        "rule": rule.name,
        "bucket": planned.bucket_label,
        "action": rule.action,
        "source": rule.source,
        "window": rule.window_label,
        "unit": unit,
        "limit": in_unit(unit, rule.limit),
        "spent": in_unit(unit, state.spent),
        "reserved": in_unit(unit, state.reserved),
        "remaining": in_unit(unit, room(rule.limit, state)),
        "resets_at": _iso(rule.window.resets_at(now)),
    }
    if rule.measure in ("input_tokens", "output_tokens"):
        view["tokens"] = rule.measure.removesuffix("_tokens")
    return view


def _tracking(rule: Rule) -> bool:
    # The always-on account tracking, not a budget anyone set.
    return rule.name == "account" and rule.action == "monitor" and rule.limit == 0


def _visible(rule: Rule) -> bool:
    if _tracking(rule):
        return False
    # The ledger keeps no request metadata, so a rule on metadata cannot be placed.
    dims = {d for d, _ in rule.filters} | set(rule.split)
    return not any(d.startswith("metadata.") for d in dims)


def _per_request(rule: Rule) -> bool:
    dims = {d for d, _ in rule.filters} | set(rule.split)
    return any(d in dims for d in _REQUEST_DIMENSIONS)


def _context(rs: RuleSet, identity: Identity, model: str, provider: str) -> Context:
    # As a request names them: budgets count under the canonical model; filters also match
    # the name as given.
    known = rs.provider_by_id.get(provider)
    canonical = rs.prices.canonical(known.pricing_id if known else provider, model) if model else ""
    return context(identity, canonical, provider, {}, requested=model.strip().lower())


def listed_models(rules: Sequence[Rule], rows: Sequence[LedgerRow]) -> list[tuple[str, str]]:
    """(model, provider) pairs to list buckets for without a model: those with spend in the
    rows, and every plain model name a rule's filter lists (before any spend is made)."""
    pairs = {(row.dims.model, row.dims.provider) for row in rows}
    for rule in rules:
        providers = literal_values(rule, "provider") or ("",)
        pairs.update((m, p) for m in literal_values(rule, "model") for p in providers)
    return sorted(pairs)


async def budgets_for(
    engine: Engine, identity: Identity, model: str = "", provider: str = ""
) -> list[dict[str, Any]]:
    """Every bucket that applies to `identity`: for one model, or (without one) for each
    model it has spend on in the rules' current windows or that a rule names."""
    rs = engine.holder.current
    now = engine.clock()
    if model:
        listed = [r for r in engine.rules(rs) if not _tracking(r)]
        planned = plan(listed, _context(rs, identity, model, provider), now)
        budget = merge(planned)
        states = await engine.store.bucket_states(list(budget.views), now)
        return [bucket_view(p, budget.state(p, states), now) for p in budget.planned]
    rules = [r for r in engine.rules(rs) if _visible(r)]
    planned = plan([r for r in rules if not _per_request(r)], _context(rs, identity, "", ""), now)
    per_request = [r for r in rules if _per_request(r)]
    if per_request:
        since = max(min(r.window.since(now) for r in per_request), int(now) - MAX_LOOKBACK_SECONDS)
        first, last = hour_range(since, int(now) + 1)
        rows = of_user(
            in_range(await engine.store.ledger_rows(first, last), first, last), identity.user
        )
        seen = {(p.rule.name, p.view.key) for p in planned}
        for cand_model, cand_provider in listed_models(per_request, rows):
            ctx = _context(rs, identity, cand_model, cand_provider)
            for p in plan(per_request, ctx, now):
                if (p.rule.name, p.view.key) not in seen:
                    seen.add((p.rule.name, p.view.key))
                    planned.append(p)
    budget = merge(planned)
    states = await engine.store.bucket_states(list(budget.views), now)
    return [bucket_view(p, budget.state(p, states), now) for p in budget.planned]


async def simulate(
    engine: Engine,
    identity: Identity,
    model: str,
    provider: Provider,
    metadata: Mapping[str, str],
    body: Mapping[str, Any],
) -> dict[str, Any]:
    rs = engine.holder.current
    now = engine.clock()
    steps: list[dict[str, Any]] = []
    input_tokens, output_tokens = tokens = requested_tokens(rs, body)
    for index, cand in enumerate(candidates(rs, model, provider)):
        cand_model, cand_provider = cand.model, cand.provider
        entry: dict[str, Any] = {
            "model": cand_model,
            "canonical": cand.canonical,
            "provider": cand_provider.id,
        }
        steps.append(entry)
        if not model_allowed(rs, identity, cand):
            entry["result"] = "model_not_allowed"
            if index == 0:
                return _outcome("deny", 403, "model_not_allowed", model, steps)
            continue
        found = priced(rs, cand, tokens, requested_geo(body))
        if found is None:
            entry["result"] = "unpriced_model"
            if index == 0:
                return _outcome("deny", 403, "unpriced_model", model, steps)
            continue
        price, estimate = found
        entry.update(
            estimate_usd=micros_to_usd(estimate),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            price_source=price.source,
        )
        budget = merge(plan(engine.rules(rs), candidate_context(identity, cand, metadata), now))
        states = await engine.store.bucket_states(list(budget.views), now)
        entry["buckets"] = _with_fit(budget, states, (estimate, tokens), rs.admission_mode, now)
        full = [b for b in entry["buckets"] if not b["fits"] and b["action"] != "monitor"]
        if any(b["action"] == "block" for b in full):
            entry["result"] = "blocked"
            return _outcome("deny", 429, "spend_limit_exceeded", model, steps)
        if full:
            entry["result"] = "fallback_rule_full"
            continue
        entry["result"] = "admitted"
        if index:
            return _outcome("fallback", 200, "fallback", cand_model, steps)
        return _outcome("allow", 200, "ok", cand_model, steps)
    return _outcome("deny", 429, "spend_limit_exceeded", model, steps)


def _outcome(
    decision: str, status: int, reason: str, model: str, steps: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "decision": decision,
        "status": status,
        "reason": reason,
        "model": model,
        "steps": steps,
    }


def _with_fit(
    budget: Plan,
    states: Sequence[BucketState],
    asked: tuple[int, tuple[int, int]],
    mode: AdmissionMode,
    now: float,
) -> list[dict[str, Any]]:
    """Each bucket's view and whether the request's amount in its measure fits it, by the
    test the store applies in the configured admission mode."""
    micros, (input_tokens, output_tokens) = asked
    out = []
    for planned in budget.planned:
        if _tracking(planned.rule):
            continue
        state = budget.state(planned, states)
        view = bucket_view(planned, state, now)
        amount = measured(planned.rule.measure, micros, input_tokens, output_tokens)
        view["fits"] = fits(state, amount, planned.rule.limit, mode)
        out.append(view)
    return out
