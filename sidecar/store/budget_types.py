"""Values exchanged with a store's budget and ledger operations (all money in µUSD).

A bucket counts one measure: µUSD, tokens (input + output, or only one of them), or
requests. A reservation holds, in each of its buckets, the estimate in that bucket's measure,
and a commit replaces it by the actual amount in the same measure.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from sidecar.model import TokenUsage

AdmissionMode = Literal["reserve", "optimistic"]
# What a bucket counts. "usd" in µUSD; the token measures in tokens; "requests" one each.
Measure = Literal["usd", "tokens", "input_tokens", "output_tokens", "requests"]
MEASURES: tuple[Measure, ...] = ("usd", "tokens", "input_tokens", "output_tokens", "requests")


def measured(measure: str, micros: int, input_tokens: int, output_tokens: int) -> int:
    """The amount of one exchange (or its estimate) in a bucket's measure.

    The one definition every store and the engine use, so a hold and its release agree.
    """
    if measure == "usd":
        return micros
    if measure == "tokens":
        return input_tokens + output_tokens
    if measure == "input_tokens":
        return input_tokens
    if measure == "output_tokens":
        return output_tokens
    if measure == "requests":
        return 1
    raise ValueError(f"unknown bucket measure {measure!r}")


@dataclass(frozen=True, slots=True)
class BucketView:
    """One budget bucket as the store needs to see it at one instant.

    Spend lives in slots keyed by their start time; the bucket's spend is the sum of slots
    with id >= `since`. A fixed window is one slot (its start: `since == slot`), a rolling
    window many. A bucket key always names the same kind of window (its rule's), so a store
    may keep the two kinds differently.
    """

    key: str
    slot: int
    since: int
    ttl_seconds: int
    limit: int
    # Monitor rules count spend but never refuse a request.
    enforce: bool = True
    measure: Measure = "usd"
    # `bucket_ref(key)`, worked out once per view (views are cached in plans).
    ref: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", bucket_ref(self.key))


def bucket_ref(key: str) -> int:
    """A bucket key as 128 bits of its BLAKE2b digest: what a store keeping very many
    buckets in memory keys them by (a 48-byte int instead of a string of a hundred or so
    bytes). Two keys sharing one is as likely as two random reservation ids colliding."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True, slots=True)
class LedgerDims:
    user: str = ""
    groups: tuple[str, ...] = ()
    token: str = ""
    kind: str = ""
    model: str = ""
    provider: str = ""


# Encoded dimensions kept, per dimensions: a reservation encodes its caller's, and a few
# callers make most of the traffic (json.dumps is most of a Redis reserve's own encoding).
# The cache starts again when full: about 300 bytes a caller, 0.3 MB at most.
_DIMS_KEPT = 1024
_dims_json: dict[LedgerDims, str] = {}


def dims_to_json(dims: LedgerDims) -> str:
    """The one encoding of ledger dimensions every store and the spool keep."""
    text = _dims_json.get(dims)
    if text is None:
        if len(_dims_json) >= _DIMS_KEPT:
            _dims_json.clear()
        text = _dims_json[dims] = json.dumps(
            [dims.user, list(dims.groups), dims.token, dims.kind, dims.model, dims.provider]
        )
    return text


def dims_from_json(text: str) -> LedgerDims:
    user, groups, token, kind, model, provider = json.loads(text)
    return LedgerDims(user, tuple(groups), token, kind, model, provider)


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    request_id: str
    buckets: tuple[BucketView, ...]
    amount: int
    mode: AdmissionMode
    now: float
    expires_at: float
    dims: LedgerDims = LedgerDims()
    # What the reservation is for (caller, model, provider, amount), as one opaque string:
    # a repeated request id is only the same reservation when this matches too.
    binding: str = ""
    # Estimated (input, output) tokens: what token buckets hold.
    tokens: tuple[int, int] = (0, 0)

    def amount_for(self, bucket: BucketView) -> int:
        """What this request holds in `bucket`, in the bucket's measure."""
        return measured(bucket.measure, self.amount, *self.tokens)


# Not frozen: a decision builds one per bucket (a dozen per Check, from every store), and a
# frozen dataclass takes three times as long to build. Nothing changes one once built.
@dataclass(slots=True)
class BucketState:
    spent: int
    reserved: int
    slots: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReserveResult:
    admitted: bool
    # Indices (into the request's buckets) of enforced buckets without room.
    failed: tuple[int, ...]
    # Spent and reserved per bucket as seen by the decision (after it, when admitted).
    states: tuple[BucketState, ...]
    # The request id had already been reserved for this same request and is still open:
    # nothing was changed.
    duplicate: bool = False
    # The request id is taken by another request, or by one already committed or expired:
    # nothing was changed and nothing admitted; the caller decides afresh under a new id.
    conflict: bool = False


ReservationState = Literal["open", "committed", "expired"]


@dataclass(frozen=True, slots=True)
class Reservation:
    """A reservation record as the store keeps it: what a completion is charged against.

    Metering attributes usage to the model, provider and caller recorded here at admission,
    never to anything the reporter of the usage claims.
    """

    request_id: str
    state: ReservationState
    # µUSD reserved at admission (what a response without usage is charged).
    estimate: int
    dims: LedgerDims
    # (input, output) tokens estimated at admission, charged to token buckets likewise.
    tokens: tuple[int, int] = (0, 0)


@dataclass(frozen=True, slots=True)
class LedgerPart:
    """Part of a charge that the ledger books under other dimensions than the reservation's
    (an advisor model's spend); the reservation's own row gets the rest of the charge."""

    dims: LedgerDims
    cost: int  # µUSD
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Charge:
    """What one exchange is charged in place of its reservation (`BudgetStore.commit`'s
    arguments), as priced from the reservation record."""

    micros: int
    usage: TokenUsage
    # The provider answered with an error; the ledger counts it in `errors`.
    error: bool = False
    others: tuple[LedgerPart, ...] = ()
    # (input, output) tokens charged to token buckets; None: the usage's own counts.
    tokens: tuple[int, int] | None = None


# Prices an exchange from its reservation record: a pure function (a store may run it on
# its own thread, inside its transaction); None commits nothing.
Pricer = Callable[[Reservation], Charge | None]


CommitStatus = Literal["committed", "duplicate", "late", "unknown"]


@dataclass(frozen=True, slots=True)
class CommitResult:
    status: CommitStatus
    # What the reservation had held back (0 when unknown).
    estimate: int = 0


@dataclass(frozen=True, slots=True)
class LedgerRow:
    hour: int
    dims: LedgerDims
    cost: int
    requests: int
    input_tokens: int
    output_tokens: int
    # Requests the provider answered with an error carrying no usage (charged $0).
    errors: int = 0
