"""The store interfaces every backend implements, and the errors they may raise.

A backend implements all of them (`Store`); each caller depends on the narrowest one it uses:
the budget store (one atomic step per decision), the ledger (what was spent, by hour), or
the document store (small JSON documents and counters). Every operation whose answer depends
on the time takes `now` from the caller, so a test drives time with its own clock.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from sidecar.model import TokenUsage
from sidecar.store.budget_types import (
    BucketState,
    BucketView,
    CommitResult,
    LedgerPart,
    LedgerRow,
    Pricer,
    Reservation,
    ReserveRequest,
    ReserveResult,
)

Doc = dict[str, Any]


class StoreUnavailable(Exception):
    """The backend could not be reached or timed out; transient by nature."""


class ShardUnavailable(StoreUnavailable):
    """One shard of a sharded backend could not be reached: only what lives on it fails,
    so callers must not treat the whole store as down."""


class DocumentStore(Protocol):
    """Small JSON objects in named collections (service tokens, runtime rules, device codes,
    signing keys) and counters that expire.

    A TTL runs from the `now` of the write; reads, compare-and-set and counters at `now`
    treat what has expired by then as absent. Every backend judges expiry by the `now` it
    is given, never by its own clock (Redis's TTLs only collect what has expired).
    """

    async def get_doc(self, collection: str, key: str, *, now: float) -> Doc | None: ...

    async def put_doc(
        self,
        collection: str,
        key: str,
        doc: Doc,
        ttl_seconds: int | None = None,
        *,
        now: float,
    ) -> None: ...

    async def delete_doc(self, collection: str, key: str) -> bool: ...

    async def list_docs(self, collection: str, *, now: float) -> list[Doc]: ...

    async def swap_doc(
        self,
        collection: str,
        key: str,
        expected: Doc | None,
        new: Doc | None,
        ttl_seconds: int | None = None,
        *,
        now: float,
    ) -> bool:
        """Atomically replace `expected` (None: absent) by `new` (None: delete)."""
        ...

    async def incr(self, key: str, amount: int, ttl_seconds: int, *, now: float) -> int:
        """A counter that expires `ttl_seconds` after its first increment (at `now`)."""
        ...

    async def scrub(self) -> None:
        """Remove what deleted or replaced data left in files (after a secret was re-sealed),
        where the backend keeps such remnants itself."""
        ...


class BudgetStore(Protocol):
    """Reservations against budget buckets: each decision is one atomic step, one round trip."""

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Admit against every bucket, all or nothing. A request id already in the store is
        a `duplicate` (admitted, nothing changed) only while its reservation is open, not
        expired and bound to the same request; otherwise a `conflict` (not admitted)."""
        ...

    async def reservation(self, request_id: str) -> Reservation | None:
        """The reservation record of `request_id`, or None when the store has none."""
        ...

    async def commit(
        self,
        request_id: str,
        actual_micros: int,
        usage: TokenUsage,
        now: float,
        error: bool = False,
        others: Sequence[LedgerPart] = (),
        tokens: tuple[int, int] | None = None,
    ) -> CommitResult:
        """Replace the reservation by the actual amounts, once; a late commit adjusts them.

        `error`: the provider answered with an error; the ledger counts it in `errors`.
        Each bucket is charged in its measure: `actual_micros`, the (input, output) `tokens`
        (default: the usage's own counts), or the one request it held; a late commit
        charges the difference to what expiry charged. The ledger books `others` under
        their own dimensions and the rest under the reservation's, with `usage`'s tokens,
        in the same atomic step."""
        ...

    async def charge(self, request_id: str, price: Pricer, now: float) -> CommitResult:
        """Read the reservation of `request_id`, price it with `price`, and `commit` what
        that returns, as one step: 'unknown' without calling `price` when there is no
        record, 'unknown' and nothing changed when `price` returns None. `price` is called
        at most once, possibly on the store's own thread; what it raises reaches the caller
        with nothing changed."""
        ...

    async def charge_many(
        self, charges: Sequence[tuple[str, Pricer]], now: float
    ) -> list[CommitResult | Exception]:
        """`charge` each (request id, pricer) of `charges` (an access log batch), in as few
        steps as the backend can, each on its own: what one raised takes its place in the
        answer, and changes nothing of the others (a step failing as a whole, the store
        unreachable, may raise instead)."""
        ...

    async def bucket_states(self, buckets: list[BucketView], now: float) -> list[BucketState]: ...

    async def settle_expired(self, now: float, limit: int = 500) -> int: ...

    async def open_reservations(self) -> int:
        """How many reservations are held, neither committed nor expired (for the metrics)."""
        ...

    async def add_spend(self, marker: str, spend: list[tuple[BucketView, int]]) -> bool:
        """Add spend made before a rule existed to its buckets' slots, at most once per
        `marker` (atomically: all of it or none). False when the marker was already used."""
        ...


# Charges in flight at once when a backend charges one by one: within any pool's size.
_CHARGES_AT_ONCE = 32


async def charge_each(
    store: BudgetStore, charges: Sequence[tuple[str, Pricer]], now: float
) -> list[CommitResult | Exception]:
    """`BudgetStore.charge_many` as one `charge` per exchange."""
    return await a_few_at_a_time(
        [functools.partial(store.charge, request_id, price, now) for request_id, price in charges]
    )


async def a_few_at_a_time(
    calls: Sequence[Callable[[], Awaitable[CommitResult]]],
) -> list[CommitResult | Exception]:
    """The answers of `calls`, run a few at a time; what one raised takes its place."""
    out: list[CommitResult | Exception] = []
    for start in range(0, len(calls), _CHARGES_AT_ONCE):
        answers = await asyncio.gather(
            *(call() for call in calls[start : start + _CHARGES_AT_ONCE]), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, Exception):
                raise answer  # cancelled: not an answer
            out.append(answer)
    return out


class Ledger(Protocol):
    """What was charged, summed per hour and dimensions (written by `BudgetStore.commit`)."""

    async def ledger_rows(self, start_hour: int, end_hour: int) -> list[LedgerRow]: ...


class Store(DocumentStore, BudgetStore, Ledger, Protocol):
    """Everything the sidecar keeps outside one process: what a backend implements."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...
