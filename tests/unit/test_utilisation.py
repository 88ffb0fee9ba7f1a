"""The utilisation gauges: each bucket counts at its latest answer from the store, however
many Checks answered in between and in whatever order callers sharing a bucket came."""

from __future__ import annotations

import time

import pytest

from sidecar.admission.plan import Plan, context, merge, plan
from sidecar.budget import utilisation
from sidecar.budget.utilisation import Utilisation
from sidecar.config.loader import parse_config
from sidecar.config.ruleset import RuleSet, build_ruleset
from sidecar.metrics import REGISTRY
from sidecar.model import Identity
from sidecar.store.budget_types import BucketState

LIMIT_USD = 100  # $100: 1,000 µUSD is one per-mille of it


def ruleset() -> RuleSet:
    return build_ruleset(
        parse_config(
            {
                "providers": [{"id": "openai", "path_prefix": "/openai/"}],
                "spend_limits": [
                    {
                        "name": "util-user",
                        "budget_usd": LIMIT_USD,
                        "window": {"fixed": "daily"},
                        "split": ["user"],
                        "alerts": [50],
                    },
                    {
                        "name": "util-org",
                        "budget_usd": LIMIT_USD,
                        "window": {"fixed": "daily"},
                        "alerts": [50],
                    },
                ],
            }
        )
    )


def plan_for(rs: RuleSet, user: str, now: float) -> Plan:
    who = Identity(kind="user", subject=user, email=f"{user}@example.com")
    return merge(plan(rs.rules, context(who, "gpt-4o", "openai", {}), now))


def used(budget: Plan, percent: int) -> tuple[BucketState, ...]:
    return tuple(BucketState(LIMIT_USD * 10_000 * percent, 0) for _ in budget.views)


def max_ratio(rule: str) -> float | None:
    return REGISTRY.get_sample_value("sidecar_budget_max_utilisation_ratio", {"rule": rule})


def at_half(rule: str) -> float | None:
    return REGISTRY.get_sample_value(
        "sidecar_budget_buckets_at_threshold", {"rule": rule, "threshold": "50"}
    )


def test_a_shared_bucket_ends_at_the_latest_answer_of_any_caller() -> None:
    rs, now = ruleset(), time.time()
    alice, bob = plan_for(rs, "alice", now), plan_for(rs, "bob", now)
    seen = Utilisation()
    seen.observe(alice, used(alice, 10))
    seen.observe(bob, used(bob, 60))
    seen.observe(alice, used(alice, 20))  # the org bucket's latest answer: 20 %
    seen.refresh(rs.rules, now)
    assert max_ratio("util-org") == pytest.approx(0.2)
    # Each user's own bucket at its own latest answer: alice 20 %, bob 60 %.
    assert max_ratio("util-user") == pytest.approx(0.6)
    assert at_half("util-user") == 1
    assert at_half("util-org") == 0


def test_answers_past_the_pending_bound_are_all_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(utilisation, "MAX_PENDING_PLANS", 3)
    rs, now = ruleset(), time.time()
    seen = Utilisation()
    plans = [plan_for(rs, f"user-{n}", now) for n in range(10)]
    for n, budget in enumerate(plans):
        seen.observe(budget, used(budget, 55 if n % 2 else 5))
    seen.observe(plans[0], used(plans[0], 1))  # the org bucket's latest answer: 1 %
    seen.refresh(rs.rules, now)
    assert at_half("util-user") == 5
    assert max_ratio("util-user") == pytest.approx(0.55)
    assert max_ratio("util-org") == pytest.approx(0.01)


def test_buckets_at_zero_are_not_kept_and_one_back_at_zero_counts_nowhere() -> None:
    rs, now = ruleset(), time.time()
    seen = Utilisation()
    alice = plan_for(rs, "alice", now)
    seen.observe(alice, used(alice, 60))
    seen.refresh(rs.rules, now)
    assert at_half("util-user") == 1
    assert max_ratio("util-user") == pytest.approx(0.6)
    # A rolling window's spend ages out: the same bucket answered at zero.
    seen.observe(alice, used(alice, 0))
    idle = [plan_for(rs, f"idle-{n}", now) for n in range(100)]
    for budget in idle:
        seen.observe(budget, used(budget, 0))
    seen.refresh(rs.rules, now)
    assert at_half("util-user") == 0
    assert max_ratio("util-user") == 0
    # The memory of a split over many users: none of the hundred idle buckets is kept.
    assert {rule: len(entry.seen) for (rule, _), entry in seen._rules.items()} == {
        "util-user": 0,
        "util-org": 0,
    }
