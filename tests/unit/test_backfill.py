"""Seeding a new rule from the ledger: which hours and buckets its earlier spend goes to."""

from __future__ import annotations

from pathlib import Path

from sidecar.budget.backfill import seed_amounts, seed_rules, seedable
from sidecar.model import TokenUsage
from sidecar.policy.rules import compile_rule
from sidecar.policy.windows import FixedWindow, RollingWindow
from sidecar.store.budget_types import LedgerDims, LedgerRow, ReserveRequest
from sidecar.store.sqlite_store import SQLiteStore

DAY_START = 1_900_022_400  # a UTC midnight
NOW = DAY_START + 10 * 3600 + 120


def row(hour: int, user: str, cost: int, groups: tuple[str, ...] = ("ml",)) -> LedgerRow:
    return LedgerRow(
        hour, LedgerDims(user, groups, "", "user", "gpt-4o", "openai"), cost, 1, 10, 10
    )


def test_fixed_window_counts_only_its_own_hours_split_by_user() -> None:
    rule = compile_rule(
        name="daily",
        limit=10**6,
        window=FixedWindow("daily"),
        filters={"group": ("ml",)},
        split=("user",),
        action="block",
    )
    rows = [
        row(DAY_START - 3600, "a", 999),
        row(DAY_START, "a", 10),
        row(DAY_START + 7200, "a", 5),
        row(DAY_START + 3600, "b", 7),
        row(DAY_START + 3600, "c", 100, groups=("other",)),
    ]
    seeded = {view.key: amount for view, amount in seed_amounts(rule, rows, NOW)}
    assert seeded == {"daily|fixed:daily:UTC|user=a": 15, "daily|fixed:daily:UTC|user=b": 7}


def test_rolling_window_keeps_hour_slots() -> None:
    rule = compile_rule(
        name="roll",
        limit=10**6,
        window=RollingWindow(6 * 3600),
        filters={},
        split=(),
        action="block",
    )
    rows = [row(NOW // 3600 * 3600 - 8 * 3600, "a", 50), row(NOW // 3600 * 3600 - 3600, "a", 4)]
    seeded = seed_amounts(rule, rows, NOW)
    assert [amount for _, amount in seeded] == [4]
    assert seeded[0][0].slot == rule.window.slot(NOW // 3600 * 3600 - 3600)


def test_metadata_rules_and_account_are_not_seeded() -> None:
    meta = compile_rule(
        name="m",
        limit=1,
        window=FixedWindow("daily"),
        filters={"metadata.team": ("x",)},
        split=(),
        action="block",
    )
    assert not seedable(meta)


async def test_seed_rules_is_once_per_rule(tmp_path: Path) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path}/s.db")
    try:
        hour = int(NOW) // 3600 * 3600
        await store.reserve(
            ReserveRequest(
                "r1",
                (),
                0,
                "reserve",
                hour + 1,
                hour + 60,
                LedgerDims("a", ("ml",), "", "user", "m", "p"),
            )
        )
        await store.commit("r1", 42, TokenUsage(1, 1), hour + 2)
        rule = compile_rule(
            name="new",
            limit=100,
            window=FixedWindow("daily"),
            filters={},
            split=("user",),
            action="block",
        )
        assert await seed_rules(store, [rule], NOW) == 1
        assert await seed_rules(store, [rule], NOW) == 0
        view = seed_amounts(rule, await store.ledger_rows(0, 2**40), NOW)[0][0]
        assert (await store.bucket_states([view], NOW))[0].spent == 42
    finally:
        await store.close()


def test_rate_rules_seed_in_their_unit_and_short_windows_not_at_all() -> None:
    hour = NOW // 3600 * 3600
    rows = [row(hour - 3600, "a", 50), row(hour, "a", 4)]
    tokens = compile_rule(
        name="tph",
        limit=10**6,
        window=RollingWindow(2 * 3600),
        filters={},
        split=(),
        action="block",
        measure="tokens",
    )
    requests = compile_rule(
        name="rph",
        limit=100,
        window=FixedWindow("daily"),
        filters={},
        split=(),
        action="block",
        measure="requests",
    )
    assert [a for _, a in seed_amounts(tokens, rows, NOW)] == [20, 20]
    assert sum(a for _, a in seed_amounts(requests, rows, NOW)) == 2
    assert all(v.measure == "tokens" for v, _ in seed_amounts(tokens, rows, NOW))
    per_minute = compile_rule(
        name="tpm",
        limit=10**6,
        window=RollingWindow(60),
        filters={},
        split=(),
        action="block",
        measure="tokens",
    )
    assert seedable(tokens) and seedable(requests) and not seedable(per_minute)
