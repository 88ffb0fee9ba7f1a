"""Every Redis key the Redis store uses, built by one pure function.

Budget keys (bucket hashes, reservations, the ledger and their indexes) all carry the hash
tag `{budget}`: in Redis Cluster a Lua script may only touch keys of one hash slot, and
reserve/commit/settle touch buckets, reservations and ledger hours that are only known once
the script runs. The price is that all budget state lives on one shard, which is fine for
this scale (a few thousand decisions per second fit one Redis core easily).

Documents are tagged per collection, so a document and its collection index share a slot
while different collections may spread across shards. Counters are single keys and need
no tag.

Lua scripts never build key names themselves: they receive them in KEYS or read them back,
fully formed, from a reservation record written with names from this module.
"""

from __future__ import annotations

from typing import Literal

DEFAULT_PREFIX = "sidecar:"

BUDGET_TAG = "{budget}"

KeyKind = Literal[
    "bucket",       # hash: slot start -> amount spent in that slot; field "r" -> reserved
    "slots",        # zset: "<slot>|<bucket hash key>" scored by the slot's expiry
    "open",         # zset: reservation hash key scored by its expiry (open ones only)
    "reservation",  # hash: one request's reservation record
    "ledger",       # hash: "<measure>|<dims JSON>" -> total, for one hour
    "hours",        # zset: ledger hours that hold data, scored by the hour
    "doc",          # string: one JSON document
    "docs",         # set: the document keys of one collection
    "counter",      # string: an expiring counter
    "backfill",     # string: set once a rule's earlier spend was added to its buckets
]

_ARITY: dict[KeyKind, int] = {
    "bucket": 1, "slots": 0, "open": 0, "reservation": 1, "ledger": 1, "hours": 0,
    "doc": 2, "docs": 1, "counter": 1, "backfill": 1,
}  # fmt: skip


def check_prefix(prefix: str) -> str:
    """Reject prefixes that would move keys to another hash slot than the tags above say."""
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"redis key prefix must not contain braces: {prefix!r}")
    return prefix


def redis_key(prefix: str, kind: KeyKind, *parts: str | int) -> str:
    """The Redis key of `kind` named by `parts` (see `_ARITY` for how many each takes)."""
    if len(parts) != _ARITY[kind]:
        raise TypeError(f"{kind} keys take {_ARITY[kind]} parts, got {len(parts)}")
    budget = f"{prefix}{BUDGET_TAG}:"
    match kind:
        case "bucket":
            return f"{budget}b:{parts[0]}"
        case "slots":
            return f"{budget}slots"
        case "open":
            return f"{budget}open"
        case "reservation":
            return f"{budget}res:{parts[0]}"
        case "ledger":
            return f"{budget}l:{parts[0]}"
        case "hours":
            return f"{budget}hours"
        case "backfill":
            return f"{budget}backfill:{parts[0]}"
        case "doc":
            # "c:" keeps the tag non-empty for an empty collection name; an empty tag
            # would make Redis hash the whole key and split doc and index across slots.
            return f"{prefix}doc:{{c:{parts[0]}}}:{parts[1]}"
        case "docs":
            return f"{prefix}docs:{{c:{parts[0]}}}"
        case "counter":
            return f"{prefix}n:{parts[0]}"
