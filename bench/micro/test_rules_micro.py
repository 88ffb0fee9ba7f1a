"""Rule matching: context → plan → merge for 20 and 200 rules, over 10,000 distinct users
(nothing per user is cached, so this is the cost of a caller never seen before)."""

from __future__ import annotations

import time

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench.micro.timing import median_seconds
from bench.policy import GROUPS, MODEL, spend_limits
from sidecar.admission.plan import context, merge, plan
from sidecar.budget.runtime_rules import account_tracking_rules
from sidecar.config.models import SpendLimitConfig
from sidecar.config.ruleset import rules_from_config
from sidecar.model import Identity
from sidecar.policy.rules import Rule

USERS = [Identity("user", f"s{n}", f"user{n}@example.com", tuple(GROUPS)) for n in range(10_000)]
BATCH = 1_000


def rules(teams: int) -> tuple[Rule, ...]:
    compiled = [
        c
        for r in spend_limits(teams)
        for c in rules_from_config(SpendLimitConfig.model_validate(r))
    ]
    return (*compiled, *account_tracking_rules())


@pytest.mark.parametrize("count", [20, 200])
def test_plan_merge(benchmark: BenchmarkFixture, count: int) -> None:
    # spend_limits(teams) has 10 fixed rules plus one per team.
    ruleset = rules(count - 10)
    assert len(ruleset) - len(account_tracking_rules()) == count
    users = iter(USERS * 1_000)
    now = time.time()

    def batch() -> None:
        for _ in range(BATCH):
            identity = next(users)
            merge(plan(ruleset, context(identity, MODEL, "openai", {}), now))

    benchmark.pedantic(batch, rounds=10, warmup_rounds=1)
    benchmark.extra_info["per_request_us"] = round(median_seconds(benchmark) / BATCH * 1e6, 2)
