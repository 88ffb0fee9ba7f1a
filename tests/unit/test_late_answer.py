"""A Check admitted only after Envoy's deadline: Envoy has refused the call already (its
ext_authz timeout), so the call never goes upstream and must cost $0. The sidecar answers
503 and releases the reservation at once, instead of leaving it to expire into a charge for
a call nobody made."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2

from sidecar.engine import Engine
from sidecar.envoy.authz import ANSWER_MARGIN_SECONDS, AuthorizationServicer
from sidecar.envoy.unanswered import call_key
from sidecar.metering.exchange import drain_charges
from sidecar.metrics import UNANSWERED_CALLS
from sidecar.store.sqlite_store import SQLiteStore
from tests.unit.test_engine import attrs, config, engine, rule


class Deadline:
    """What the servicer reads of a gRPC context: the time left before Envoy's deadline,
    one reading after another (the first when the Check arrives, the next once decided)."""

    def __init__(self, *readings: float) -> None:
        self.readings = list(readings)

    def time_remaining(self) -> float:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


def check_request(
    model: str, max_tokens: int, started: tuple[int, int] = (0, 0)
) -> external_auth_pb2.CheckRequest:
    found = attrs(model, "", max_tokens=max_tokens)
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.raw_body = found.method, found.path, found.body or b""
    http.headers["content-type"] = "application/json"
    http.headers["x-request-id"] = "call-1"
    request.attributes.request.time.seconds, request.attributes.request.time.nanos = started
    return request


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    st = SQLiteStore(f"sqlite:///{tmp_path}/late.db")
    yield st
    await st.close()


class Withdrawals:
    """The ids the engine withdraws, as it withdraws them."""

    def __init__(self, eng: Engine) -> None:
        self.ids: list[str] = []
        self._withdraw = eng.withdraw
        eng.withdraw = self  # type: ignore[method-assign]

    async def __call__(self, request_id: str) -> None:
        self.ids.append(request_id)
        await self._withdraw(request_id)


async def ledger(store: SQLiteStore) -> tuple[int, int, int]:
    """Cost in µUSD, requests and errors on the ledger, all hours."""
    rows = await store.ledger_rows(0, 2**40)
    return (
        sum(r.cost for r in rows),
        sum(r.requests for r in rows),
        sum(r.errors for r in rows),
    )


def cent_engine(store: SQLiteStore) -> Engine:
    """$0.05 a day for the cent-* models (each call of these tests reserves $0.03)."""
    return engine(config(spend_limits=[rule("b", 0.05, "block", ["cent-*"])]), store)


async def test_a_check_admitted_after_the_deadline_is_refused_and_its_reservation_released(
    store: SQLiteStore,
) -> None:
    # $0.05 a day; each call reserves $0.03 (3 output tokens at $10,000 per million).
    eng = cent_engine(store)
    servicer = AuthorizationServicer(eng)
    withdrawn = Withdrawals(eng)
    late_before = UNANSWERED_CALLS._value.get()

    answer = external_auth_pb2.CheckResponse.FromString(
        await servicer.check(check_request("cent-a", 3), Deadline(1.9, 0.0))
    )

    assert answer.denied_response.status.code == 503
    assert {h.header.key for h in answer.denied_response.headers} >= {"retry-after"}
    assert UNANSWERED_CALLS._value.get() == late_before + 1
    # Released at $0: the reservation is done, the ledger holds one errored call at $0.
    (request_id,) = withdrawn.ids
    found = await store.reservation(request_id)
    assert found is not None and found.state == "committed"
    assert await store.open_reservations() == 0
    assert await ledger(store) == (0, 1, 1)
    # The $0.03 is free again: a second call of $0.03 fits under $0.05.
    again = external_auth_pb2.CheckResponse.FromString(
        await servicer.check(check_request("cent-a", 3), Deadline(1.9))
    )
    assert again.status.code == 0 and again.HasField("ok_response")
    assert eng.inflight.count() == 1  # the answered one is waited for; the late one is not


async def test_a_check_admitted_with_time_left_is_answered_and_keeps_its_reservation(
    store: SQLiteStore,
) -> None:
    eng = cent_engine(store)
    servicer = AuthorizationServicer(eng)
    late_before = UNANSWERED_CALLS._value.get()

    margin = ANSWER_MARGIN_SECONDS * 2
    answer = external_auth_pb2.CheckResponse.FromString(
        await servicer.check(check_request("cent-a", 3), Deadline(1.9, margin))
    )

    assert answer.status.code == 0 and answer.HasField("ok_response")
    assert await store.open_reservations() == 1
    assert UNANSWERED_CALLS._value.get() == late_before
    # The reservation still holds its $0.03: a second $0.03 does not fit under $0.05.
    refused = external_auth_pb2.CheckResponse.FromString(
        await servicer.check(check_request("cent-a", 3), Deadline(1.9))
    )
    assert refused.denied_response.status.code == 429


async def test_a_refusal_decided_late_is_answered_as_decided(store: SQLiteStore) -> None:
    # Nothing was reserved for a refusal: it goes out as it is, whatever the time.
    eng = engine(config(spend_limits=[rule("b", 0.0, "block", ["cent-*"])]), store)
    servicer = AuthorizationServicer(eng)

    answer = external_auth_pb2.CheckResponse.FromString(
        await servicer.check(check_request("cent-a", 3), Deadline(1.9, 0.0))
    )

    assert answer.denied_response.status.code == 429
    assert await store.open_reservations() == 0
    assert await ledger(store) == (0, 0, 0)


async def test_a_check_admitted_for_a_call_envoy_logged_as_gone_is_refused_and_released(
    store: SQLiteStore,
) -> None:
    # The client left while the Check waited, and Envoy's log of it came first.
    eng = cent_engine(store)
    servicer = AuthorizationServicer(eng)
    withdrawn = Withdrawals(eng)
    started = (1_796_000_000, 5_000)
    assert servicer.unanswered.gone(call_key(*started, "call-1")) is None

    answer = external_auth_pb2.CheckResponse.FromString(
        await servicer.check(check_request("cent-a", 3, started), Deadline(1.9))
    )

    assert answer.denied_response.status.code == 503
    (request_id,) = withdrawn.ids
    found = await store.reservation(request_id)
    assert found is not None and found.state == "committed"
    assert await store.open_reservations() == 0
    assert await ledger(store) == (0, 1, 1)


async def test_an_admitted_call_is_remembered_until_envoy_logs_it_gone(
    store: SQLiteStore,
) -> None:
    eng = cent_engine(store)
    servicer = AuthorizationServicer(eng)
    started = (1_796_000_000, 7_000)

    answer = external_auth_pb2.CheckResponse.FromString(
        await servicer.check(check_request("cent-a", 3, started), Deadline(1.9))
    )

    assert answer.HasField("ok_response")
    request_id = servicer.unanswered.gone(call_key(*started, "call-1"))
    assert request_id is not None
    found = await store.reservation(request_id)
    assert found is not None and found.state == "open"


async def test_a_late_checks_release_completes_when_grpc_cancels_the_check_midway(
    store: SQLiteStore,
) -> None:
    # Envoy gives up on a late Check at its deadline and gRPC cancels the handler, often
    # while it is releasing the reservation: the release must still happen, or the
    # reservation expires into a charge for a call that never went upstream.
    eng = cent_engine(store)
    servicer = AuthorizationServicer(eng)
    withdrawn = Withdrawals(eng)
    committing, go_on = asyncio.Event(), asyncio.Event()
    commit = store.commit

    async def held_commit(*args: Any, **kwargs: Any) -> Any:
        committing.set()
        await go_on.wait()
        return await commit(*args, **kwargs)

    store.commit = held_commit  # type: ignore[method-assign]
    check = asyncio.create_task(servicer.check(check_request("cent-a", 3), Deadline(1.9, 0.0)))
    await committing.wait()
    check.cancel()
    with pytest.raises(asyncio.CancelledError):
        await check
    go_on.set()
    await drain_charges()

    (request_id,) = withdrawn.ids
    found = await store.reservation(request_id)
    assert found is not None and found.state == "committed"
    assert await store.open_reservations() == 0
    assert await ledger(store) == (0, 1, 1)
