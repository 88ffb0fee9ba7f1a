"""The owned store's answer without an await (`reserve_ready`): the same decision as
`reserve`, and none at all when `reserve` would have to wait for the file."""

from __future__ import annotations

from pathlib import Path

from sidecar.model import TokenUsage
from sidecar.store.budget_types import ReserveRequest, ReserveResult
from sidecar.store.sqlite_owned import OwnedSQLiteStore
from tests.contract.test_sqlite_owned import NOW, B, C, file_state, owned
from tests.support.reserve import reserve_request


def ready(store: OwnedSQLiteStore, request: ReserveRequest) -> ReserveResult:
    answer = store.reserve_ready(request)
    assert answer is not None, "decided without an await"
    return answer


def held(answer: ReserveResult) -> list[tuple[int, int]]:
    return [(s.spent, s.reserved) for s in answer.states]


async def test_ready_decides_as_reserve_once_the_buckets_are_in_memory(tmp_path: Path) -> None:
    async with owned(tmp_path) as store:
        first = reserve_request("r1", 60, B, now=NOW)
        assert store.reserve_ready(first) is None  # B never read: reserve reads it first
        assert (await store.reserve(first)).admitted
        assert not ready(store, reserve_request("r2", 50, B, now=NOW)).admitted
        admitted = ready(store, reserve_request("r3", 40, B, now=NOW))
        assert admitted.admitted and held(admitted) == [(0, 100)]
        # A retry of an open id: its binding is read first (memory does not keep it).
        retry = reserve_request("r3", 40, B, now=NOW)
        assert store.reserve_ready(retry) is None
        assert (await store.reserve(retry)).duplicate
    assert await file_state(tmp_path, B) == [(0, 100)]


async def test_ready_waits_for_a_bucket_memory_let_go_of(tmp_path: Path) -> None:
    async with owned(tmp_path) as store:
        await store.reserve(reserve_request("r1", 10, C, now=NOW))
        await store.commit("r1", 10, TokenUsage(), NOW)
        store._totals.evict(0)  # C holds nothing now: memory may let it go
        later = reserve_request("r2", 10, C, now=NOW)
        assert store.reserve_ready(later) is None
        answer = await store.reserve(later)
        assert answer.admitted and held(answer) == [(10, 10)]


async def test_ready_waits_while_an_expired_reservation_is_due(tmp_path: Path) -> None:
    async with owned(tmp_path) as store:
        await store.reserve(reserve_request("r1", 30, B, now=NOW, ttl=5))
        after = reserve_request("r2", 30, B, now=NOW + 10)
        assert store.reserve_ready(after) is None  # r1's expiry is charged first
        assert held(await store.reserve(after)) == [(30, 30)]
