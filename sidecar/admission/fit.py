"""Whether an amount fits a bucket: the one admission test every store and view applies."""

from __future__ import annotations

from sidecar.store.budget_types import AdmissionMode, BucketState


def fits(state: BucketState, amount: int, limit: int, mode: AdmissionMode) -> bool:
    """Whether a request asking `amount` of a bucket at `state` is admitted under `limit`.

    reserve: the amount must fit next to what is spent and held; exactly reaching the limit
    is allowed. optimistic: nothing is held at admission, so a request is admitted while the
    bucket is not yet spent to its limit, whatever it asks (the overshoot is bounded by the
    requests in flight when the limit is reached).
    """
    if mode == "optimistic":
        return state.spent < limit
    return state.spent + state.reserved + amount <= limit


def room(limit: int, state: BucketState) -> int:
    """What is left of a bucket's limit after its spend and holds (never below zero)."""
    return max(0, limit - state.spent - state.reserved)
