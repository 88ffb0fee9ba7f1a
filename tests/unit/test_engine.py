"""The engine's precedence and answers, with a real SQLite store and a fixed identity."""

from __future__ import annotations

import asyncio
import functools
import json
import operator
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sidecar.budget.spool import Spool
from sidecar.config.loader import parse_config
from sidecar.config.ruleset import RuleSet, RuleSetHolder, build_ruleset
from sidecar.engine import Engine, new_request_id
from sidecar.metering.charge import Observed
from sidecar.model import Identity, Iteration, RequestAttrs, TokenUsage
from sidecar.store.base import ShardUnavailable, StoreUnavailable
from sidecar.store.sqlite_store import SQLiteStore

NOW = 1_900_000_000.0
ALICE = Identity(kind="user", subject="a", email="alice@example.com", groups=("ml",))
CENT = {"provider": "openai", "model": "cent-*", "input_per_mtok": 0, "output_per_mtok": 10000}


class FixedAuth:
    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    async def identify(self, headers: Mapping[str, str]) -> tuple[Identity, tuple[str, ...]]:
        return self.identity, ()


def config(**extra: Any) -> RuleSet:
    base: dict[str, Any] = {
        "providers": [{"id": "openai", "path_prefix": "/openai/"}],
        "pricing": {"unknown_model": "reject", "overrides": [CENT]},
    }
    base.update(extra)
    return build_ruleset(parse_config(base))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    st = SQLiteStore(f"sqlite:///{tmp_path}/e.db")
    yield st
    await st.close()


def engine(rs: RuleSet, store: SQLiteStore, identity: Identity = ALICE) -> Engine:
    auth = FixedAuth(identity)
    return Engine(RuleSetHolder(rs), store, lambda _: auth, clock=lambda: NOW)


def attrs(model: str, rid: str, max_tokens: int = 1) -> RequestAttrs:
    body = json.dumps({"model": model, "max_tokens": max_tokens, "messages": []}).encode()
    return RequestAttrs("POST", "/openai/v1/chat/completions", {}, body, rid)


def rule(name: str, usd: float, action: str, models: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "budget_usd": usd,
        "window": {"fixed": "daily"},
        "filter": {"model": models},
        "action": action,
        **extra,
    }


async def test_block_wins_over_fallback(store: SQLiteStore) -> None:
    rs = config(
        spend_limits=[rule("b", 0.0, "block", ["cent-a"]), rule("f", 0.0, "fallback", ["cent-a"])],
        fallbacks={"cent-a": [{"model": "cent-b"}]},
    )
    decision = await engine(rs, store).check(attrs("cent-a", "r1"))
    assert decision.http_status == 429
    assert json.loads(decision.body)["error"]["rule"] == "b"


async def test_fallback_skips_disallowed_and_unpriced_targets(store: SQLiteStore) -> None:
    rs = config(
        spend_limits=[rule("f", 0.0, "fallback", ["cent-a"])],
        models={"rules": [{"groups": ["ml"], "allow": ["cent-a", "cent-c", "nope"]}]},
        fallbacks={"cent-a": [{"model": "cent-b"}, {"model": "nope"}, {"model": "cent-c"}]},
    )
    decision = await engine(rs, store).check(attrs("cent-a", "r1"))
    assert decision.allowed and decision.model == "cent-c"
    assert decision.headers["x-sidecar-fallback-from"] == "cent-a"
    assert decision.headers["x-sidecar-route"] == "fallback"


async def test_monitor_rules_never_block(store: SQLiteStore) -> None:
    rs = config(spend_limits=[rule("m", 0.0, "monitor", ["cent-*"])])
    eng = engine(rs, store)
    for i in range(3):
        assert (await eng.check(attrs("cent-a", f"r{i}"))).allowed


async def test_allowlist_comes_before_budgets(store: SQLiteStore) -> None:
    rs = config(
        spend_limits=[rule("b", 0.0, "block", ["cent-a"])],
        models={"rules": [{"groups": ["ml"], "allow": ["cent-z"]}]},
    )
    decision = await engine(rs, store).check(attrs("cent-a", "r1"))
    assert decision.http_status == 403
    assert json.loads(decision.body)["error"]["type"] == "model_not_allowed"


async def test_commit_replaces_reservation_with_actual(store: SQLiteStore) -> None:
    rs = config(spend_limits=[rule("b", 0.05, "block", ["cent-*"])])
    eng = engine(rs, store)
    # Each request reserves $0.03 (3 output tokens) but really costs $0.01.
    first = await eng.check(attrs("cent-a", "r1", max_tokens=3))
    assert first.allowed and first.request_id
    assert not (await eng.check(attrs("cent-a", "r2", max_tokens=3))).allowed
    used = Observed(TokenUsage(0, 1), complete=True)
    result, cost = await eng.charge(first.request_id, used)
    assert (result.status, cost) == ("committed", 10_000)
    assert (await eng.check(attrs("cent-a", "r3", max_tokens=3))).allowed
    again, _ = await eng.charge(first.request_id, used)
    assert again.status == "duplicate"


@pytest.mark.parametrize("status", [401, 429, 500, 503])
async def test_provider_error_without_usage_costs_nothing(store: SQLiteStore, status: int) -> None:
    rs = config(spend_limits=[rule("b", 0.05, "block", ["cent-*"])])
    eng = engine(rs, store)
    admitted = await eng.check(attrs("cent-a", "r1", max_tokens=3))
    result, cost = await eng.charge(admitted.request_id, Observed(status=status))
    assert (result.status, cost) == ("committed", 0)
    [row] = await store.ledger_rows(int(NOW) // 3600 * 3600, int(NOW) // 3600 * 3600 + 3600)
    assert (row.cost, row.requests, row.errors) == (0, 1, 1)
    # The reservation is released: the whole budget is there again.
    assert (await eng.check(attrs("cent-a", "r2", max_tokens=5))).allowed


async def test_error_that_reports_usage_pays_it_and_a_cut_success_its_reservation(
    store: SQLiteStore,
) -> None:
    eng = engine(config(), store)
    errored = await eng.check(attrs("cent-a", "e1", max_tokens=3))
    _, cost = await eng.charge(
        errored.request_id, Observed(TokenUsage(0, 1), complete=True, status=500)
    )
    assert cost == 10_000
    cut = await eng.check(attrs("cent-a", "c1", max_tokens=3))
    _, cost = await eng.charge(cut.request_id, Observed(status=200))
    assert cost == 30_000  # never $0 for a success
    hour = int(NOW) // 3600 * 3600
    [row] = await store.ledger_rows(hour, hour + 3600)
    assert (row.cost, row.requests, row.errors) == (40_000, 2, 1)


async def test_optimistic_mode_overshoots_reserve_does_not(store: SQLiteStore) -> None:
    limits = [rule("b", 0.02, "block", ["cent-*"])]
    optimistic = engine(config(spend_limits=limits, admission={"mode": "optimistic"}), store)
    admitted = [(await optimistic.check(attrs("cent-a", f"o{i}"))).allowed for i in range(5)]
    assert all(admitted)  # nothing committed yet: every concurrent request gets in
    reserve = engine(config(spend_limits=[rule("c", 0.02, "block", ["cent-*"])]), store)
    admitted = [(await reserve.check(attrs("cent-a", f"r{i}"))).allowed for i in range(5)]
    assert admitted == [True, True, False, False, False]


async def test_remaining_header_is_the_tightest_bucket(store: SQLiteStore) -> None:
    rs = config(
        spend_limits=[
            rule("loose", 1, "block", ["cent-*"]),
            rule("tight", 0.05, "block", ["cent-*"]),
        ]
    )
    decision = await engine(rs, store).check(attrs("cent-a", "r1"))
    assert decision.response_headers["x-sidecar-budget-remaining"] == "0.040000"


async def test_charge_books_an_advisor_under_its_model_and_logs_unknown_steps(
    store: SQLiteStore,
) -> None:
    # cent-a costs $0.01 an output token, cent-advisor $0.02 (a pattern override of its own).
    advisor = {**CENT, "model": "cent-advisor", "output_per_mtok": 20000}
    rs = config(
        pricing={"unknown_model": "reject", "overrides": [advisor, CENT]},
        spend_limits=[rule("b", 10, "block", ["cent-*"])],
    )
    eng = engine(rs, store)
    admitted = await eng.check(attrs("cent-a", "r1", max_tokens=3))
    steps = (
        Iteration("message", TokenUsage(0, 1)),
        Iteration("advisor_message", TokenUsage(0, 2), "cent-advisor"),
        Iteration("rethink", TokenUsage(0, 3)),
    )
    with capture_logs() as logs:
        result, cost = await eng.charge(
            admitted.request_id, Observed(TokenUsage(0, 1), complete=True, iterations=steps)
        )
    # 1 + 3 output tokens at cent-a's rate, 2 at the advisor's: $0.04 + $0.04.
    assert (result.status, cost) == ("committed", 80_000)
    rows = {
        r.dims.model: (r.cost, r.requests, r.output_tokens)
        for r in await store.ledger_rows(0, 2**40)
    }
    assert rows == {"cent-a": (40_000, 1, 4), "cent-advisor": (40_000, 0, 2)}
    [warning] = [e for e in logs if e["event"] == "unknown_iteration_type"]
    assert warning["types"] == ["rethink"] and warning["model"] == "cent-a"


class Gated:
    """A store whose reservations wait for the test, and which says when it commits."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.committed = asyncio.Event()
        self.ids: list[str] = []

    async def reserve(self, request: Any) -> Any:
        self.ids.append(request.request_id)
        self.entered.set()

        async def in_the_store() -> Any:
            await self.gate.wait()
            return await self.inner.reserve(request)

        # A store's own work is not cancelled with its caller (a SQLite thread, a Redis
        # server): it completes whether or not anyone still waits for the answer.
        return await asyncio.shield(asyncio.ensure_future(in_the_store()))

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self.inner.commit(*args, **kwargs)
        finally:
            self.committed.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_check_abandoned_mid_reservation_is_released_at_zero(store: SQLiteStore) -> None:
    rs = config(spend_limits=[rule("b", 0.05, "block", ["cent-*"])])
    gated = Gated(store)
    eng = engine(rs, gated)  # type: ignore[arg-type]
    check = asyncio.ensure_future(eng.check(attrs("cent-a", "r1", max_tokens=3)))
    await gated.entered.wait()
    check.cancel()  # Envoy's deadline passed: gRPC cancels the Check
    gated.gate.set()  # ...while the store still completes the reservation
    with pytest.raises(asyncio.CancelledError):
        await check
    await asyncio.wait_for(gated.committed.wait(), 10)
    (request_id,) = gated.ids
    found = await store.reservation(request_id)
    assert found is not None and found.state == "committed"
    # Nothing spent, nothing held: the $0.03 the request reserved is free again.
    assert (await eng.check(attrs("cent-a", "r2", max_tokens=5))).allowed


class LostReply(Gated):
    """The store makes the reservation, then the connection drops before its answer."""

    async def reserve(self, request: Any) -> Any:
        self.ids.append(request.request_id)
        await self.inner.reserve(request)
        raise StoreUnavailable("connection closed by server")


async def test_reservation_whose_answer_was_lost_is_released_when_the_store_is_back(
    store: SQLiteStore, tmp_path: Path
) -> None:
    rs = config(spend_limits=[rule("b", 0.05, "block", ["cent-*"])])
    lost = LostReply(store)
    eng = engine(rs, lost)  # type: ignore[arg-type]
    eng.spool = Spool(str(tmp_path / "spool.db"))
    try:
        refused = await eng.check(attrs("cent-a", "r1", max_tokens=3))
        assert (refused.allowed, refused.reason) == (False, "store_unavailable")
        (request_id,) = lost.ids
        held = await store.reservation(request_id)
        assert held is not None and held.state == "open"  # the store did reserve
        assert await eng.spool.replay(store, NOW) == 1
        released = await store.reservation(request_id)
        assert released is not None and released.state == "committed"
        eng.store = store
        eng._store_down_until = 0.0
        # The refused request holds nothing: the whole $0.05 is there for the next one.
        assert (await eng.check(attrs("cent-a", "r2", max_tokens=5))).allowed
    finally:
        await eng.spool.close()


class OneShardDown(Gated):
    """A sharded store whose shard holding the first request's buckets is down."""

    async def reserve(self, request: Any) -> Any:
        self.ids.append(request.request_id)
        if len(self.ids) == 1:
            raise ShardUnavailable("redis: connection refused (one shard)")
        return await self.inner.reserve(request)


async def test_a_shard_that_is_down_fails_only_the_decisions_that_need_it(
    store: SQLiteStore,
) -> None:
    rs = config(spend_limits=[rule("b", 0.05, "block", ["cent-*"])])
    eng = engine(rs, OneShardDown(store))  # type: ignore[arg-type]
    refused = await eng.check(attrs("cent-a", "r1", max_tokens=3))
    assert (refused.allowed, refused.reason) == (False, "store_unavailable")
    # The next decision still asks the store at once (no "recently failed" pause for the
    # whole store), and its shards answer.
    assert (await eng.check(attrs("cent-a", "r2", max_tokens=3))).allowed


def test_reservation_ids_are_version_7_uuids_random_after_their_millisecond() -> None:
    at = 1_800_000_000_123_456_789
    ids = {new_request_id(lambda: at) for _ in range(2000)}
    assert len(ids) == 2000
    for rid in ids:
        parsed = uuid.UUID(hex=rid)
        assert parsed.hex == rid and len(rid) == 32
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert int(rid[:12], 16) == 1_800_000_000_123  # the millisecond, big-endian
    # Every bit after the time but version and variant varies: ids minted in the same
    # millisecond are not guessable from one another (74 random bits).
    fixed = ((1 << 80) - 1) & ~((0xF << 76) | (0x3 << 62))
    assert functools.reduce(operator.or_, (int(r, 16) ^ int(min(ids), 16) for r in ids)) == fixed


def test_reservation_ids_sort_by_the_millisecond_they_were_minted_in() -> None:
    # What keeps the SQLite store's index of ids appending instead of writing random pages.
    clock = iter(range(1_800_000_000_000_000_000, 1_800_000_000_100_000_000, 1_000_000))
    ids = [new_request_id(lambda: next(clock)) for _ in range(100)]
    assert ids == sorted(ids)
    # By default, the wall clock's.
    assert abs(int(new_request_id()[:12], 16) - time.time_ns() // 1_000_000) < 60_000


def test_a_forked_child_mints_other_ids_than_its_parent() -> None:
    # Ids come from a buffer of random bytes; a child must not reuse what its parent had.
    new_request_id()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent, then gone
        os.write(write_end, new_request_id().encode())
        os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child_id) == 32
    assert child_id != new_request_id()
