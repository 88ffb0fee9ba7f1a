"""The models a request may be admitted as: the one asked for, then its fallbacks, each
allowed or not for the caller, with the dimensions its buckets are planned from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.admission.plan import context
from sidecar.config.ruleset import Provider, RuleSet
from sidecar.model import Identity
from sidecar.policy.rules import Context


@dataclass(frozen=True)
class Candidate:
    """A model a request may be admitted as: the one asked for, then its fallbacks.

    `model` is the name sent upstream (the caller's, or the fallback's as configured);
    `canonical` is the one policy compares and budgets and the ledger count under.
    """

    model: str
    canonical: str
    provider: Provider


def candidates(rs: RuleSet, model: str, provider: Provider) -> list[Candidate]:
    """The model asked for, then each configured fallback whose provider is known."""
    first = Candidate(model, rs.prices.canonical(provider.pricing_id, model), provider)
    out = [first]
    for step in rs.fallback_chain(model, first.canonical):
        target = rs.provider_by_id.get(step.provider) if step.provider else provider
        if target is not None:
            out.append(
                Candidate(step.model, rs.prices.canonical(target.pricing_id, step.model), target)
            )
    return out


def model_allowed(rs: RuleSet, identity: Identity, candidate: Candidate) -> bool:
    return rs.allowlist.allows(identity.groups, candidate.model, candidate.canonical)


def candidate_context(
    identity: Identity, candidate: Candidate, metadata: Mapping[str, str]
) -> Context:
    return context(
        identity,
        candidate.canonical,
        candidate.provider.id,
        metadata,
        requested=candidate.model.strip().lower(),
    )
