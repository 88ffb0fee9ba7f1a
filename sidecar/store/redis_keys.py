"""Every Redis key the Redis store uses, built by one pure function.

Budget state is sharded by bucket owner: each bucket's keys are tagged with its owner, read
from the bucket's own key (the first split value, "user=alice" in
"daily|fixed:daily|user=alice"; a rule without split is its own owner), so on a Redis
Cluster buckets spread over the shards while one caller's buckets stay together and one
script per shard reserves them all. A bucket has a counters string (spent, held, window,
alive-until: four big-endian 64-bit fields, one GET or SETRANGE in scripts, BITFIELD_RO
here) and, for a rolling window, a hash of its slots; a backfill marker shares its bucket's
tag.
Everything else a decision writes belongs to one shard and carries that shard's node tag
`{T}` (a short tag the store picked because the shard owns its hash slot): a request's
record of its buckets on that shard (the home record, on its first bucket's shard, also
says for whom and which other shards hold parts), the shard's open, held and slot indexes,
and its ledger: one row per hour and dims, indexed per hour. On a cluster the reservation
ids the store mints name their home record's node tag, so a commit finds it from the id
alone; for other ids a pointer tagged by the request id names it. On one Redis there is one
node tag. The registry `tags` lists every node tag ever used, so
the expiry sweep and ledger reads find them after the cluster's layout changed.

Documents are tagged per collection, so a document and its collection index share a slot
while different collections may spread across shards. Counters are single keys and need
no tag.

Lua scripts never build key names themselves: they receive them in KEYS or ARGV, or read
them back, fully formed, from a record written with names from this module. Two names are
derived from others, by the rules `counters_key` and `ledger_row` state, which
budget_lib.lua follows: a ledger row from its hour's index (a commit books an advisor
model's part in a row of its own), and, for data of the earlier layout only (whose records
name bucket hashes), a bucket's counters from its hash key and back.
"""

from __future__ import annotations

import re
from typing import Literal

DEFAULT_PREFIX = "sidecar:"

KeyKind = Literal[
    "bucket",  # hash: a rolling window's slot start -> amount spent in that slot
    "counters",  # string: a bucket's spent, held, window and alive-until (i64 x4, big-endian)
    "backfill",  # string: set once a rule's earlier spend was added to this bucket
    "home",  # string: the node tag of a request's home record (cluster, ids minted elsewhere)
    "record",  # string: one request's record of its buckets on one shard (redis_record)
    "open",  # zset: home records of one shard scored by their expiry
    "held",  # zset: other groups' records of one shard scored by their expiry
    "slots",  # zset: "<slot>|<bucket hash key>" of one shard, scored by slot expiry
    "ledger",  # hash: "<measure>|<dims JSON>" -> total (the earlier layout, still read)
    "ledger_index",  # set: the dims JSON of every ledger row of one shard and hour
    "ledger_row",  # string: cost, requests, input, output, errors (i64 x5, big-endian)
    "hours",  # zset: ledger hours that hold data on one shard, scored by the hour
    "tags",  # set: every node tag budget state was written under
    "doc",  # string: one JSON document
    "docs",  # set: the document keys of one collection
    "counter",  # hash: an expiring counter's count and window end
]

_ARITY: dict[KeyKind, int] = {
    "bucket": 1, "counters": 1, "backfill": 2, "home": 1, "record": 2, "open": 1,
    "held": 1, "slots": 1, "ledger": 2, "ledger_index": 2, "ledger_row": 3, "hours": 1,
    "tags": 0, "doc": 2, "docs": 1, "counter": 1,
}  # fmt: skip


# "|<dimension>=<value>": the first split segment of a bucket key (sidecar.policy.rules).
_SPLIT = re.compile(r"\|([a-z_]+=[^|]*)")


def bucket_owner(bucket: str) -> str:
    """Who a bucket belongs to, for its hash tag: its first split value, or the whole key
    for a bucket a rule keeps for everyone."""
    match = _SPLIT.search(bucket)
    return match.group(1) if match else bucket


def check_prefix(prefix: str) -> str:
    """Reject prefixes that would move keys to another hash slot than the tags above say."""
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"redis key prefix must not contain braces: {prefix!r}")
    return prefix


def redis_key(prefix: str, kind: KeyKind, *parts: str | int) -> str:
    """The Redis key of `kind` named by `parts` (see `_ARITY` for how many each takes).

    Node-tagged kinds take the node tag first."""
    if len(parts) != _ARITY[kind]:
        raise TypeError(f"{kind} keys take {_ARITY[kind]} parts, got {len(parts)}")
    match kind:
        case "bucket":
            # "o:" inside the braces keeps the tag non-empty for an empty owner.
            return f"{prefix}b:{{o:{bucket_owner(str(parts[0]))}}}:{parts[0]}"
        case "counters":
            return counters_key(redis_key(prefix, "bucket", *parts))
        case "backfill":
            return f"{prefix}bf:{{o:{bucket_owner(str(parts[0]))}}}:{parts[0]}:{parts[1]}"
        case "home":
            return f"{prefix}h:{{r:{parts[0]}}}"
        case "record":
            return f"{prefix}{{{parts[0]}}}:r:{parts[1]}"
        case "open":
            return f"{prefix}{{{parts[0]}}}:open"
        case "held":
            return f"{prefix}{{{parts[0]}}}:held"
        case "slots":
            return f"{prefix}{{{parts[0]}}}:slots"
        case "ledger":
            return f"{prefix}{{{parts[0]}}}:l:{parts[1]}"
        case "ledger_index":
            return f"{prefix}{{{parts[0]}}}:li:{parts[1]}"
        case "ledger_row":
            return ledger_row(redis_key(prefix, "ledger_index", parts[0], parts[1]), str(parts[2]))
        case "hours":
            return f"{prefix}{{{parts[0]}}}:hours"
        case "tags":
            return f"{prefix}tags"
        case "doc":
            # "c:" keeps the tag non-empty for an empty collection name; an empty tag
            # would make Redis hash the whole key and split doc and index across slots.
            return f"{prefix}doc:{{c:{parts[0]}}}:{parts[1]}"
        case "docs":
            return f"{prefix}docs:{{c:{parts[0]}}}"
        case "counter":
            # "w:", not the "n:" of the plain strings older versions counted in: a replica
            # of either version never meets the other's type (those expire on their own).
            return f"{prefix}w:{parts[0]}"


def counters_key(bucket_key: str) -> str:
    """A bucket's counters key from its hash key: "b:" before the tag becomes "c:" (the
    prefix holds no brace, so the first brace opens the tag)."""
    brace = bucket_key.index("{")
    return f"{bucket_key[: brace - 2]}c:{bucket_key[brace:]}"


def ledger_row(index_key: str, dims: str) -> str:
    """A ledger row's key: its hour's index key, "|", the row's dims JSON."""
    return f"{index_key}|{dims}"
