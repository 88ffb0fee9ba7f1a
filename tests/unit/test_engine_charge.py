"""The engine's charge when the store fails part-way, the reporter disagrees with the record,
or the price list changed since admission: the reservation is read and committed in one store
step, and each way it can end is still told apart."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sidecar.budget.spool import Spool
from sidecar.engine import AttributionMismatch
from sidecar.metering.charge import Observed
from sidecar.model import TokenUsage
from sidecar.store.base import StoreUnavailable
from sidecar.store.budget_types import Charge, CommitResult, Pricer, Reservation
from sidecar.store.sqlite_store import SQLiteStore
from tests.unit.test_engine import CENT, NOW, attrs, config, engine, rule

HOUR = int(NOW) // 3600 * 3600
LIMITS = [rule("b", 0.05, "block", ["cent-*"])]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    st = SQLiteStore(f"sqlite:///{tmp_path}/e.db")
    yield st
    await st.close()


class FailsToCommit:
    """The real store, whose disk fails after the reservation was read and priced."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner

    async def charge(self, request_id: str, price: Pricer, now: float) -> CommitResult:
        return await self.inner.charge(request_id, self._failing(price), now)

    async def charge_many(self, charges: Any, now: float) -> Any:
        return await self.inner.charge_many(
            [(request_id, self._failing(price)) for request_id, price in charges], now
        )

    @staticmethod
    def _failing(price: Pricer) -> Pricer:
        def then_fail(record: Reservation) -> Charge | None:
            price(record)
            raise sqlite3.OperationalError("disk I/O error")

        return then_fail

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Unreachable:
    """The real store for admission, unreachable when the charge comes."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner

    async def charge(self, request_id: str, price: Pricer, now: float) -> CommitResult:
        raise StoreUnavailable("connection refused")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_charge_priced_but_not_committed_is_spooled_at_its_price(
    store: SQLiteStore, tmp_path: Path
) -> None:
    eng = engine(config(spend_limits=LIMITS), store)
    admitted = await eng.check(attrs("cent-a", "r1", max_tokens=3))  # reserves $0.03
    eng.store = FailsToCommit(store)
    eng.spool = Spool(str(tmp_path / "spool.db"))
    try:
        with capture_logs() as logs:
            result, cost = await eng.charge(
                admitted.request_id, Observed(TokenUsage(0, 1), complete=True)
            )
        assert (result.status, cost) == ("unknown", 10_000)
        assert [e["event"] for e in logs] == ["commit_spooled"]
        held = await store.reservation(admitted.request_id)
        assert held is not None and held.state == "open"  # the failed step changed nothing
        assert await eng.spool.replay(store, NOW) == 1
        [row] = await store.ledger_rows(HOUR, HOUR + 3600)
        assert (row.cost, row.requests, row.output_tokens) == (10_000, 1, 1)
    finally:
        await eng.spool.close()


async def test_charge_priced_but_not_committed_without_a_spool_is_an_error(
    store: SQLiteStore,
) -> None:
    eng = engine(config(spend_limits=LIMITS), store)
    admitted = await eng.check(attrs("cent-a", "r1", max_tokens=3))
    eng.store = FailsToCommit(store)
    with pytest.raises(StoreUnavailable, match="disk I/O error"):
        await eng.charge(admitted.request_id, Observed(TokenUsage(0, 1), complete=True))
    assert (await store.reservation(admitted.request_id)).state == "open"  # type: ignore[union-attr]


async def test_charge_while_the_store_is_unreachable_spools_only_reported_usage(
    store: SQLiteStore, tmp_path: Path
) -> None:
    eng = engine(config(spend_limits=LIMITS), store)
    admitted = await eng.check(attrs("cent-a", "r1", max_tokens=3))
    eng.store = Unreachable(store)
    eng.spool = Spool(str(tmp_path / "spool.db"))
    try:
        # No record to read the reserved amount from: without usage nothing can be spooled.
        with capture_logs() as logs:
            result, cost = await eng.charge(
                admitted.request_id, Observed(status=200), hint=("cent-a", "openai")
            )
        assert (result.status, cost) == ("unknown", 0)
        assert [e["event"] for e in logs] == ["commit_failed"]
        # With usage, the hint prices it.
        result, cost = await eng.charge(
            admitted.request_id,
            Observed(TokenUsage(0, 2), complete=True),
            hint=("cent-a", "openai"),
        )
        assert (result.status, cost) == ("unknown", 20_000)
    finally:
        await eng.spool.close()


async def test_charge_reported_for_another_model_is_refused_and_changes_nothing(
    store: SQLiteStore,
) -> None:
    eng = engine(config(spend_limits=LIMITS), store)
    admitted = await eng.check(attrs("cent-a", "r1", max_tokens=3))
    with pytest.raises(AttributionMismatch, match="cent-a"):
        await eng.charge(
            admitted.request_id,
            Observed(TokenUsage(0, 1), complete=True),
            expect=("cent-b", "openai"),
        )
    assert (await store.reservation(admitted.request_id)).state == "open"  # type: ignore[union-attr]
    result, _ = await eng.charge(
        admitted.request_id, Observed(TokenUsage(0, 1), complete=True), expect=("cent-a", "openai")
    )
    assert result.status == "committed"


async def test_charge_of_a_model_no_longer_priced_leaves_its_estimate_held(
    store: SQLiteStore,
) -> None:
    eng = engine(config(spend_limits=LIMITS), store)
    admitted = await eng.check(attrs("cent-a", "r1", max_tokens=3))
    other = {**CENT, "model": "other-*"}
    eng.holder.swap(
        config(spend_limits=LIMITS, pricing={"unknown_model": "reject", "overrides": [other]})
    )
    with capture_logs() as logs:
        result, cost = await eng.charge(
            admitted.request_id, Observed(TokenUsage(0, 1), complete=True)
        )
    assert (result.status, cost) == ("unknown", 0)
    assert [e["event"] for e in logs] == ["estimate_left_to_expiry"]
    assert (await store.reservation(admitted.request_id)).state == "open"  # type: ignore[union-attr]


async def test_charge_of_an_unknown_request_id_is_unknown(store: SQLiteStore) -> None:
    eng = engine(config(spend_limits=LIMITS), store)
    with capture_logs() as logs:
        result, cost = await eng.charge("never-admitted", Observed(TokenUsage(0, 1)))
    assert (result.status, cost) == ("unknown", 0)
    assert [e["event"] for e in logs] == ["completion_unknown"]


class Counting:
    """The real store, counting the calls of each kind of charge."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.calls: list[str] = []

    async def charge(self, request_id: str, price: Pricer, now: float) -> CommitResult:
        self.calls.append("charge")
        return await self.inner.charge(request_id, price, now)

    async def charge_many(self, charges: Any, now: float) -> Any:
        self.calls.append(f"charge_many/{len(charges)}")
        return await self.inner.charge_many(charges, now)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_charge_many_charges_each_as_alone_in_one_store_step(store: SQLiteStore) -> None:
    eng = engine(config(spend_limits=[rule("b", 1, "block", ["cent-*"])]), store)
    used, unused, already = [
        await eng.check(attrs("cent-a", f"r{i}", max_tokens=3)) for i in (1, 2, 3)
    ]
    await eng.charge(already.request_id, Observed(TokenUsage(0, 2), complete=True))
    counting = Counting(store)
    eng.store = counting
    answers = await eng.charge_many(
        [
            (used.request_id, Observed(TokenUsage(0, 1), complete=True), None),
            (unused.request_id, Observed(status=200), None),  # no usage: its reservation
            ("never-admitted", Observed(TokenUsage(0, 1), complete=True), None),
            (already.request_id, Observed(TokenUsage(0, 2), complete=True), None),
        ]
    )
    assert counting.calls == ["charge_many/4"]
    assert [(r.status, cost) for r, cost in answers] == [  # type: ignore[misc]
        ("committed", 10_000),
        ("committed", 30_000),
        ("unknown", 0),
        ("duplicate", 20_000),
    ]
    [row] = await store.ledger_rows(HOUR, HOUR + 3600)
    assert (row.cost, row.requests, row.output_tokens) == (60_000, 3, 3)


async def test_charge_many_while_the_store_is_unreachable_is_each_as_alone(
    store: SQLiteStore, tmp_path: Path
) -> None:
    eng = engine(config(spend_limits=LIMITS), store)
    admitted = await eng.check(attrs("cent-a", "r1", max_tokens=3))
    other = await eng.check(attrs("cent-a", "r2", max_tokens=1))

    class Down(Unreachable):
        async def charge_many(self, charges: Any, now: float) -> Any:
            raise StoreUnavailable("connection refused")

    eng.store = Down(store)
    eng.spool = Spool(str(tmp_path / "spool.db"))
    try:
        with capture_logs() as logs:
            answers = await eng.charge_many(
                [
                    (admitted.request_id, Observed(status=200), ("cent-a", "openai")),
                    (
                        other.request_id,
                        Observed(TokenUsage(0, 2), complete=True),
                        ("cent-a", "openai"),
                    ),
                ]
            )
        assert [(r.status, cost) for r, cost in answers] == [  # type: ignore[misc]
            ("unknown", 0),
            ("unknown", 20_000),
        ]
        assert [e["event"] for e in logs] == ["commit_failed", "commit_spooled"]
    finally:
        await eng.spool.close()


async def test_charge_many_answers_a_failure_in_its_place(store: SQLiteStore) -> None:
    eng = engine(config(spend_limits=LIMITS), store)
    admitted = await eng.check(attrs("cent-a", "r1", max_tokens=3))
    eng.store = FailsToCommit(store)
    with capture_logs():
        [answer] = await eng.charge_many(
            [(admitted.request_id, Observed(TokenUsage(0, 1), complete=True), None)]
        )
    assert isinstance(answer, StoreUnavailable)  # no spool: the caller logs it
