"""Every store admits exactly what `sidecar.admission.fit.fits` admits: the Redis Lua
reservation (one server and a cluster) and the SQLite store are driven through the store API
with generated bucket states, amounts, limits, measures and admission modes, and each answer
is compared with the Python function's."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.admission.fit import fits
from sidecar.store.base import Store
from sidecar.store.budget_types import (
    AdmissionMode,
    BucketState,
    BucketView,
    LedgerDims,
    Measure,
    ReserveRequest,
)
from sidecar.store.factory import open_store
from tests.support.backends import backend_url

T0 = 1_900_000_000.0
_counter = itertools.count()

amounts = st.integers(0, 3_000)
modes = st.sampled_from(["reserve", "optimistic"])
measures = st.sampled_from(["usd", "tokens", "requests"])


@pytest.fixture(params=["redis", "cluster", "sqlite", "sqlite-owned"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, bool | None]:
    """The URL, and whether the store owns it (SQLite kept in the process's memory)."""
    owner = True if request.param == "sqlite-owned" else None
    return backend_url(request, request.param, tmp_path, "fit.db"), owner


def _request(rid: str, view: BucketView, amount: int, mode: AdmissionMode) -> ReserveRequest:
    # The amount is both the µUSD estimate and the input-token estimate, so it is what a
    # usd or tokens bucket is asked for; a requests bucket is asked for one.
    return ReserveRequest(
        rid, (view,), amount, mode, T0, T0 + 600, LedgerDims(user="fit"), tokens=(amount, 0)
    )


async def _decide(
    store: Store,
    measure: Measure,
    spent: int,
    holds: list[int],
    limit: int,
    amount: int,
    mode: AdmissionMode,
) -> tuple[BucketState, bool, bool]:
    """Bring a fresh bucket to `spent` and the `holds` through the store API, then ask it to
    admit `amount`: (the state before, the store's answer, the Python function's)."""
    name = f"fit{next(_counter)}"
    # Monitor-only views of the bucket: the setup is always admitted, whatever the limit.
    counting = BucketView(name, 0, 0, 3_600, 0, enforce=False, measure=measure)
    if spent:
        assert await store.add_spend(f"{name}-spend", [(counting, spent)])
    for i, hold in enumerate(holds):
        held = await store.reserve(_request(f"{name}-hold{i}", counting, hold, "reserve"))
        assert held.admitted
    state = (await store.bucket_states([counting], T0))[0]
    enforced = BucketView(name, 0, 0, 3_600, limit, enforce=True, measure=measure)
    asked = _request(f"{name}-ask", enforced, amount, mode)
    result = await store.reserve(asked)
    return state, result.admitted, fits(state, asked.amount_for(enforced), limit, mode)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    measure=measures,
    spent=amounts,
    holds=st.lists(amounts, max_size=3),
    limit=amounts,
    amount=amounts,
    mode=modes,
)
# The boundaries: exactly reaching the limit, one over it, and spent exactly at it.
@example(measure="usd", spent=400, holds=[300], limit=1_000, amount=300, mode="reserve")
@example(measure="usd", spent=400, holds=[300], limit=1_000, amount=301, mode="reserve")
@example(measure="usd", spent=1_000, holds=[], limit=1_000, amount=0, mode="optimistic")
@example(measure="tokens", spent=999, holds=[500], limit=1_000, amount=3_000, mode="optimistic")
@example(measure="requests", spent=2, holds=[0, 0], limit=4, amount=0, mode="reserve")
@example(measure="requests", spent=2, holds=[0, 0], limit=5, amount=0, mode="reserve")
def test_store_admits_exactly_what_the_fit_function_admits(
    store_url: tuple[str, bool | None],
    measure: Measure,
    spent: int,
    holds: list[int],
    limit: int,
    amount: int,
    mode: AdmissionMode,
) -> None:
    async def main() -> tuple[BucketState, bool, bool]:
        store = await open_store(store_url[0], owner=store_url[1])
        try:
            return await _decide(store, measure, spent, holds, limit, amount, mode)
        finally:
            await store.close()

    state, admitted, expected = asyncio.run(main())
    # The setup reached the state it was generated for, in the bucket's measure.
    held = len(holds) if measure == "requests" else sum(holds)
    assert (state.spent, state.reserved) == (spent, held)
    assert admitted is expected, (state, limit, amount, mode)
