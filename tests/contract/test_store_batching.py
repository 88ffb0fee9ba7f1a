"""Contract for what the hot path's batching must not change: requests with more buckets
than one SQL statement carries, and many reservations queued at once (group commit)."""

from __future__ import annotations

import asyncio

from sidecar.model import TokenUsage
from sidecar.store.base import Store
from tests.contract.test_store_contract import NOW, bucket, req


async def test_hundreds_of_buckets_reserve_commit_and_read_back(store: Store) -> None:
    # 450 buckets: more than one multi-row statement's worth, with a repeated key last.
    buckets = [bucket(f"b:wide:{i}", limit=1_000) for i in range(450)]
    buckets.append(buckets[0])
    first = await store.reserve(req("w1", 30, *buckets))
    assert first.admitted
    assert [s.reserved for s in first.states[:3]] == [30, 30, 30]
    second = await store.reserve(req("w2", 40, *buckets[:449]))
    assert second.admitted
    # The repeated key holds both of its shares.
    assert second.states[0].reserved == 30 * 2 + 40
    assert second.states[448].reserved == 30 + 40
    assert (await store.commit("w1", 25, TokenUsage(10, 5), NOW)).status == "committed"
    after = await store.bucket_states(buckets[:449], NOW)
    assert after[0].spent == 25 * 2 and after[0].reserved == 40
    assert after[448].spent == 25 and after[448].reserved == 40


async def test_concurrent_reservations_each_decided_once(store: Store) -> None:
    # Fifty at once against room for twenty: whatever the store batches, exactly twenty fit.
    shared = bucket("b:crowd", limit=200)
    results = await asyncio.gather(*(store.reserve(req(f"c{i}", 10, shared)) for i in range(50)))
    assert sum(r.admitted for r in results) == 20
    state = (await store.bucket_states([shared], NOW))[0]
    assert state.reserved == 200
    # A duplicate inside the crowd is recognised, not held twice.
    again = await store.reserve(req("c0", 10, shared))
    assert again.duplicate or not results[0].admitted
