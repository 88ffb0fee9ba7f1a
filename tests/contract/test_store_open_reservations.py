"""Both stores count the reservations they hold (the `sidecar_reservations_open` gauge): one
per admitted reservation, none for a refused one, until it is committed or expires."""

from __future__ import annotations

from sidecar.model import TokenUsage
from sidecar.store.base import Store
from tests.contract.test_store_contract import NOW, bucket, req


async def test_open_reservations_counts_held_ones_only(store: Store) -> None:
    b = bucket(limit=100)
    assert await store.open_reservations() == 0
    assert (await store.reserve(req("r1", 40, b, ttl=60))).admitted
    assert (await store.reserve(req("r2", 40, b, ttl=600))).admitted
    assert not (await store.reserve(req("r3", 40, b))).admitted
    assert await store.open_reservations() == 2
    await store.commit("r2", 10, TokenUsage(0, 1), NOW + 1)
    assert await store.open_reservations() == 1
    assert await store.settle_expired(NOW + 61) == 1
    assert await store.open_reservations() == 0
