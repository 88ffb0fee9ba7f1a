"""The admission core: the one fit test in both modes, and `/v1/simulate` agreeing with a
real check under each admission mode."""

from __future__ import annotations

from typing import Literal

import pytest

from sidecar.admission.fit import fits, room
from sidecar.budget.explain import simulate
from sidecar.store.budget_types import BucketState
from sidecar.store.sqlite_store import SQLiteStore
from tests.unit.test_rate_limits import BODY, BOT, Clock, attrs, engine, ruleset, store

__all__ = ["store"]  # the fixture, shared with the rate-limit tests


def test_reserve_mode_fits_what_is_spent_held_and_asked_up_to_the_limit() -> None:
    assert fits(BucketState(60, 30), 10, 100, "reserve")
    assert not fits(BucketState(60, 30), 11, 100, "reserve")
    assert not fits(BucketState(0, 0), 101, 100, "reserve")


def test_optimistic_mode_admits_while_spent_is_below_the_limit_whatever_is_asked() -> None:
    assert fits(BucketState(99, 500), 1_000, 100, "optimistic")
    assert not fits(BucketState(100, 0), 1, 100, "optimistic")


def test_room_is_what_is_left_and_never_negative() -> None:
    assert room(100, BucketState(60, 30)) == 10
    assert room(100, BucketState(90, 30)) == 0


@pytest.mark.parametrize("mode", ["reserve", "optimistic"])
async def test_simulate_answers_as_the_real_check_does_in_each_admission_mode(
    store: SQLiteStore, mode: Literal["reserve", "optimistic"]
) -> None:
    # Asks more tokens than the whole limit: reserve refuses it, optimistic admits it while
    # nothing is spent yet.
    rs = ruleset(
        {"name": "tpm", "tokens": 1000, "window": {"rolling": "1m"}}, admission={"mode": mode}
    )
    eng = engine(rs, store, Clock())
    result = await simulate(
        eng, BOT, "big", rs.provider_by_id["openai"], {}, {**BODY, "max_tokens": 2000}
    )
    decision = await eng.check(attrs(max_tokens=2000))
    assert decision.allowed is (mode == "optimistic")
    assert result["decision"] == ("allow" if decision.allowed else "deny")
    assert result["steps"][0]["buckets"][0]["fits"] is decision.allowed
