"""Property tests of the budget math on both stores: for any interleaving of reserve, commit
and expiry, a bucket never holds more than its limit plus the estimation error of the
requests that were admitted, in whichever unit it counts (µUSD, tokens, requests); commits
are idempotent."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.model import TokenUsage
from sidecar.store.base import Store
from sidecar.store.budget_types import BucketView, LedgerDims, Measure, ReserveRequest
from sidecar.store.factory import open_store
from tests.support.backends import backend_url

LIMIT = 1_000
# Bucket i counts MEASURES[i] against LIMITS[i].
MEASURES: tuple[Measure, ...] = ("usd", "tokens", "requests")
LIMITS = (LIMIT, LIMIT, 6)
T0 = 1_900_000_000.0
_counter = itertools.count()


@dataclass(frozen=True)
class Reserve:
    amount: int
    buckets: tuple[int, ...]
    tokens: int = 0


@dataclass(frozen=True)
class Commit:
    which: int
    actual: int
    tokens: int = 0


@dataclass(frozen=True)
class Advance:
    seconds: int


ops = st.lists(
    st.one_of(
        st.builds(
            Reserve,
            st.integers(0, 400),
            st.sets(st.integers(0, 2), min_size=1, max_size=3).map(tuple),
            st.integers(0, 400),
        ),
        st.builds(Commit, st.integers(0, 50), st.integers(0, 600), st.integers(0, 600)),
        st.builds(Advance, st.integers(1, 40)),
    ),
    min_size=1,
    max_size=40,
)


async def run(store: Store, program: list[Any], prefix: str) -> None:
    buckets = [
        BucketView(f"{prefix}b{i}", 0, 0, 10**6, LIMITS[i], measure=MEASURES[i]) for i in range(3)
    ]
    now = T0
    admitted: dict[str, tuple[tuple[int, int, int], tuple[int, ...]]] = {}
    order: list[str] = []
    committed: dict[str, tuple[int, int]] = {}
    excess = [0, 0, 0]  # estimation error (actual above estimate) per bucket, in its unit
    for op in program:
        if isinstance(op, Reserve):
            rid = f"{prefix}{next(_counter)}"
            chosen = tuple(buckets[i] for i in op.buckets)
            result = await store.reserve(
                ReserveRequest(
                    rid,
                    chosen,
                    op.amount,
                    "reserve",
                    now,
                    now + 30,
                    LedgerDims(user="p"),
                    tokens=(op.tokens, 0),
                )
            )
            if result.admitted:
                admitted[rid] = ((op.amount, op.tokens, 1), op.buckets)
                order.append(rid)
        elif isinstance(op, Commit) and order:
            rid = order[op.which % len(order)]
            first = rid not in committed
            commit = await store.commit(rid, op.actual, TokenUsage(op.tokens, 0), now)
            if first:
                assert commit.status in ("committed", "late")
                committed[rid] = (op.actual, op.tokens)
                estimates, touched = admitted[rid]
                actuals = (op.actual, op.tokens, 1)
                for i in touched:
                    excess[i] += max(0, actuals[i] - estimates[i])
            else:
                assert commit.status == "duplicate"
        elif isinstance(op, Advance):
            now += op.seconds
            await store.settle_expired(now)
        states = await store.bucket_states(buckets, now)
        for i, state in enumerate(states):
            assert state.reserved >= 0
            assert state.spent + state.reserved <= LIMITS[i] + excess[i], (i, state, excess)
    # Idempotence: replaying every commit changes nothing.
    before = await store.bucket_states(buckets, now)
    for rid, (actual, tokens) in committed.items():
        await store.commit(rid, actual, TokenUsage(tokens, 0), now)
    assert await store.bucket_states(buckets, now) == before


@pytest.fixture(params=["sqlite", "sqlite-owned", "sqlite-owned-evicting", "redis", "cluster"])
def store_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, bool | None]:
    """The URL, and whether the store owns it (SQLite kept in the process's memory; and
    "evicting": memory lets go of every bucket without a hold at each housekeeping pass,
    so decisions keep reading buckets back from the file)."""
    owner = True if request.param.startswith("sqlite-owned") else None
    if request.param == "sqlite-owned-evicting":
        monkeypatch.setattr("sidecar.store.sqlite_owned._BUCKETS_KEPT", 0)
    return backend_url(request, request.param, tmp_path, "p.db"), owner


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(program=ops)
def test_budget_invariants_hold_for_any_interleaving(
    store_url: tuple[str, bool | None], program: list[Any]
) -> None:
    async def main() -> None:
        store = await open_store(store_url[0], owner=store_url[1])
        try:
            # Each example gets fresh buckets: a unique prefix keeps examples apart.
            await run(store, program, f"ex{next(_counter)}-")
        finally:
            await store.close()

    asyncio.run(main())
