"""Building a ReserveRequest for the store contract tests: the fields they vary, defaults else."""

from __future__ import annotations

from sidecar.store.budget_types import AdmissionMode, BucketView, LedgerDims, ReserveRequest

ALICE = LedgerDims("alice@example.com", ("ml",), "", "user", "gpt-4o", "openai")


def reserve_request(
    rid: str,
    amount: int,
    *buckets: BucketView,
    now: float,
    mode: AdmissionMode = "reserve",
    ttl: float = 600,
    dims: LedgerDims = ALICE,
    tokens: tuple[int, int] = (0, 0),
) -> ReserveRequest:
    return ReserveRequest(
        request_id=rid,
        buckets=tuple(buckets),
        amount=amount,
        mode=mode,
        now=now,
        expires_at=now + ttl,
        dims=dims,
        tokens=tokens,
    )
