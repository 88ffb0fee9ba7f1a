"""Bucket plans reused per request context until a window boundary or a rule change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidecar.admission.plan import Plan, context, merge, plan
from sidecar.admission.plan_cache import PlanCache, context_key, validity
from sidecar.budget.runtime_rules import SPEND_LIMITS, RuntimeRules
from sidecar.config.loader import parse_config
from sidecar.config.ruleset import RuleSet, RuleSetHolder, build_ruleset
from sidecar.engine import Engine
from sidecar.model import Identity
from sidecar.policy.rules import Rule
from sidecar.store.budget_types import BucketState
from sidecar.store.sqlite_store import SQLiteStore
from tests.unit.test_engine import ALICE, CENT, FixedAuth, attrs

MIDNIGHT = 1_900_022_400.0  # 2030-03-18T00:00:00Z
DAILY = {
    "name": "daily",
    "budget_usd": 10,
    "window": {"fixed": "daily"},
    "split": ["user"],
    "action": "block",
}
MINUTE = {
    "name": "minute",
    "budget_usd": 10,
    "window": {"rolling": "1m"},
    "split": ["user"],
    "action": "block",
}


def ruleset(*limits: dict[str, Any]) -> RuleSet:
    return build_ruleset(
        parse_config(
            {
                "providers": [{"id": "openai", "path_prefix": "/openai/"}],
                "pricing": {"unknown_model": "reject", "overrides": [CENT]},
                "spend_limits": list(limits),
            }
        )
    )


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _engine(
    rs: RuleSet, store: SQLiteStore, clock: Clock, runtime: list[tuple[Rule, ...]] | None = None
) -> Engine:
    auth = FixedAuth(ALICE)
    extra = runtime if runtime is not None else [()]
    return Engine(
        RuleSetHolder(rs), store, lambda _: auth, runtime_rules=lambda: extra[0], clock=clock
    )


def test_validity_is_the_earliest_slot_end_of_the_rules() -> None:
    rules = ruleset(DAILY, MINUTE).rules
    named = {r.name: r for r in rules}
    now = MIDNIGHT + 30.5
    assert validity([named["daily"]], now) == (MIDNIGHT, MIDNIGHT + 86_400)
    assert validity([named["daily"], named["minute"]], now) == (MIDNIGHT + 30, MIDNIGHT + 31)


def test_cache_answers_only_inside_the_validity_and_for_the_same_rules() -> None:
    cache: PlanCache[str] = PlanCache()
    rules: tuple[object, ...] = (["a"], [])
    assert cache.get(rules, "k", 10) is None
    cache.put("k", "plan", 10, 20)
    assert cache.get(rules, "k", 10) == "plan" and cache.get(rules, "k", 19.9) == "plan"
    assert cache.get(rules, "k", 20) is None and cache.get(rules, "k", 9.9) is None
    # Equal but not the same objects: a reload built them anew, so nothing is kept.
    assert cache.get((["a"], []), "k", 15) is None
    assert cache.get(rules, "k", 15) is None


def test_a_full_cache_starts_over() -> None:
    cache: PlanCache[int] = PlanCache(max_entries=2)
    rules = ((), ())
    cache.get(rules, 0, 0)
    for i in range(3):
        cache.put(i, i, 0, 1)
    assert cache.get(rules, 2, 0) == 2 and cache.get(rules, 0, 0) is None


async def test_engine_plans_match_a_fresh_plan_across_a_midnight(tmp_path: Path) -> None:
    rs = ruleset(DAILY, MINUTE)
    store = SQLiteStore(f"sqlite:///{tmp_path}/p.db")
    clock = Clock(MIDNIGHT - 0.5)
    eng = _engine(rs, store, clock)
    try:
        for now in (MIDNIGHT - 0.5, MIDNIGHT - 0.2, MIDNIGHT, MIDNIGHT + 59.9, MIDNIGHT + 60):
            clock.now = now
            decision = await eng.check(attrs("cent-1", f"r{now}"))
            assert decision.allowed
            ctx = {
                "user": (ALICE.user,),
                "group": ALICE.groups,
                "token": (),
                "kind": (ALICE.kind,),
                "model": ("cent-1",),
                "provider": ("openai",),
            }
            cached = eng._plan(rs, (), ctx, now)
            assert cached.views == merge(plan(rs.rules, ctx, now)).views, now
    finally:
        await store.close()


async def test_a_runtime_rule_change_is_planned_at_once(tmp_path: Path) -> None:
    rs = ruleset(DAILY)
    store = SQLiteStore(f"sqlite:///{tmp_path}/p.db")
    runtime: list[tuple[Rule, ...]] = [()]
    eng = _engine(rs, store, Clock(MIDNIGHT + 5), runtime)
    try:
        first = await eng.check(attrs("cent-1", "a"))
        runtime[0] = ruleset({**MINUTE, "name": "late"}).rules
        second = await eng.check(attrs("cent-1", "b"))
        assert "late" not in first.rules and "late" in second.rules
    finally:
        await store.close()


def test_identity_is_part_of_the_key() -> None:
    rs = ruleset(DAILY)
    bob = Identity(kind="user", subject="b", email="bob@example.com", groups=("ml",))
    views = {}
    for who in (ALICE, bob):
        ctx = {
            "user": (who.user,),
            "group": who.groups,
            "token": (),
            "kind": (who.kind,),
            "model": ("cent-1",),
            "provider": ("openai",),
        }
        views[who.user] = merge(plan(rs.rules, ctx, MIDNIGHT)).views
    assert views[ALICE.user] != views[bob.user]


async def test_refreshed_runtime_rules_stay_the_same_objects_until_they_change(
    tmp_path: Path,
) -> None:
    """The plans are kept per rule objects: a refresh that finds nothing new must not
    hand out new ones (every caller would be planned afresh at every refresh)."""
    store = SQLiteStore(f"sqlite:///{tmp_path}/runtime.db")
    await store.open()
    try:
        runtime = RuntimeRules(store, "acct")
        await runtime.refresh()
        first = runtime()
        await runtime.refresh()
        assert runtime() is first
        limit = {"name": "late", "budget_usd": 5, "window": {"fixed": "daily"}}
        await store.put_doc(SPEND_LIMITS, "late", limit, now=MIDNIGHT)
        await runtime.refresh()
        changed = runtime()
        assert changed is not first and [r.name for r in changed][-1] == "late"
        await runtime.refresh()
        assert runtime() is changed
    finally:
        await store.close()


def test_plans_of_different_callers_share_what_depends_only_on_the_rules() -> None:
    rs = ruleset(DAILY, MINUTE, {**DAILY, "name": "org", "split": []})
    now = MIDNIGHT + 30

    def plan_of(user: str) -> Plan:
        who = Identity(kind="user", subject=user, email=user)
        return merge(plan(rs.rules, context(who, "m", "openai", {}), now))

    a, b = plan_of("a@x.io"), plan_of("b@x.io")
    assert [v.key for v in a.views] != [v.key for v in b.views]
    assert a.enforced is b.enforced and len(a.enforced) == 3
    assert a.rule_names() is b.rule_names() == ("daily", "minute", "org")
    # Per view: the window's slot and TTL ints, and an unsplit rule's (empty) labels.
    for x, y in zip(a.views, b.views, strict=True):
        assert x.slot is y.slot and x.ttl_seconds is y.ttl_seconds
    assert a.planned[2].labels is b.planned[2].labels and dict(a.planned[2].labels) == {}


def test_plans_share_the_planned_buckets_that_name_no_caller_and_read_states_by_position() -> None:
    group_split = {**DAILY, "name": "team", "split": ["group"]}
    rs = ruleset(DAILY, {**DAILY, "name": "org", "split": []}, group_split)
    now = MIDNIGHT + 30

    def plan_of(user: str) -> Plan:
        who = Identity(kind="user", subject=user, email=user, groups=("eng", "ml"))
        return merge(plan(rs.rules, context(who, "m", "openai", {}), now))

    a, b = plan_of("a@x.io"), plan_of("b@x.io")
    by_rule_a = {(p.rule.name, p.view.key): p for p in a.planned}
    by_rule_b = {(p.rule.name, p.view.key): p for p in b.planned}
    for key, planned in by_rule_a.items():
        if "user" in planned.labels:
            assert by_rule_b.get(key) is None  # each caller's own bucket
        else:
            assert by_rule_b[key] is planned  # org and each group's: one object
    assert a.positions is b.positions
    states = [BucketState(i, 0) for i in range(len(a.views))]
    for p in a.planned:
        assert a.state(p, states).spent == a.views.index(p.view)


def test_context_keys_are_equal_exactly_when_the_contexts_are() -> None:
    alice = Identity(kind="user", subject="a", email="a@x.io", groups=("eng",))
    same = Identity(kind="user", subject="a", email="a@x.io", groups=("eng",))
    others = [
        Identity(kind="user", subject="a", email="b@x.io", groups=("eng",)),
        Identity(kind="user", subject="a", email="a@x.io", groups=("eng", "ml")),
        Identity(kind="user", subject="a", email="a@x.io", groups=()),
    ]
    key = context_key(context(alice, "m", "openai", {}))
    assert key == context_key(context(same, "m", "openai", {}))
    for other in others:
        assert key != context_key(context(other, "m", "openai", {}))
    assert key != context_key(context(alice, "m", "openai", {"project": "x"}))
    # A value moved from one dimension to another is another context.
    assert context_key({"a": ("x",), "b": ()}) != context_key({"a": (), "b": ("x",)})
