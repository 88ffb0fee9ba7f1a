"""A reservation's record on one Redis shard, as bytes: written here, read by the Lua scripts.

The record (budget_lib.lua documents it) is packed with `struct`, in formats Lua's struct
library reads back in one call: a fixed head, then ten fields per bucket. Numbers travel
as 64-bit integers and doubles, so a script reads them without parsing any text (a JSON
record cost a commit a third of its time in cjson and tonumber). Strings are prefixed with
their length. The first byte is the state letter, the one byte a finish rewrites.

Each record ends with a nonce: random bytes that name this one write of it. A server keeps
what its reserve decoded of the records it wrote, and its commit uses that instead of
reading and decoding the whole record again once the stored record still ends with the same
nonce (budget_lib.lua `load_known`). Readers of the layout before the nonce stop at the last
bucket, so they read these records as they did theirs, and these readers read theirs (no
nonce: always decoded).

Records written before this layout are JSON arrays (they begin with "["); they are still
read, here and in Lua, until they expire.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
from typing import NamedTuple

# Lua's formats (budget_lib.lua HEAD and ENTRY) are the same, with its `c0` strings after
# their `i4` lengths.
_HEAD = struct.Struct(">cqdbqqqd")  # state, estimate, expires_at, home, hour, tokens, created
_TEXTS = 5  # binding, dims JSON, ledger index key, other groups' tags, request id
_LENGTH = struct.Struct(">i")
_COUNT = struct.Struct(">h")
_BUCKET = struct.Struct(">qqqqqbq")  # slot, since, ttl, estimate, held, enforced, limit
_PLANNED = struct.Struct(">qqqbq")  # slot, since, ttl, enforced, limit

# Buckets one record may name: its count is a signed 16-bit field.
MAX_BUCKETS = 32_767
# The nonce's length (budget_lib.lua NONCE): 64 random bits, so two writes of one record
# key never share one.
NONCE_BYTES = 8


def text(value: str) -> bytes:
    """A string as a record holds it: its UTF-8 length, then its bytes."""
    raw = value.encode("utf-8")
    return _LENGTH.pack(len(raw)) + raw


NO_TEXT = text("")


class Head(NamedTuple):
    estimate: int
    expires_at: float
    home: bool
    hour: int
    tokens: tuple[int, int]
    created: float
    binding: str
    dims: str  # "" unless home
    ledger_index: str  # "" unless home
    groups: str  # the other groups' node tags, comma-separated ("" unless home)
    request_id: str


def bucket(
    counters: bytes,
    slots: bytes,
    measure: bytes,
    window: tuple[int, int, int],
    estimate: int,
    held: int,
    limit: int | None,
) -> bytes:
    """One bucket's fields: its counters key, slot hash key (`NO_TEXT` for a fixed window)
    and measure, each already `text`; its (slot, since, ttl); its estimate, what it holds of
    it, and its limit (None: not enforced)."""
    slot, since, ttl = window
    enforced = limit is not None
    return b"".join(
        (
            counters,
            slots,
            measure,
            _BUCKET.pack(slot, since, ttl, estimate, held, enforced, limit if enforced else 0),
        )
    )


def plan_part(
    counters: bytes,
    slots: bytes,
    measure: bytes,
    window: tuple[int, int, int],
    limit: int | None,
) -> bytes:
    """What `bucket` says of a bucket but the request's own amounts (its estimate and hold,
    which follow from the head's estimate, tokens and mode), for `plan_id`."""
    enforced = limit is not None
    return b"".join((counters, slots, measure, _PLANNED.pack(*window, enforced, limit or 0)))


def plan_id(parts: list[bytes]) -> bytes:
    """The digest of a record's buckets but their amounts (`plan_part` of each): a server
    keeps the buckets it decoded by it, so a reserve naming the same buckets with the same
    windows and limits decodes only the record's head (budget_lib.lua `decode_planned`).
    128 bits: two different plans never share one."""
    return hashlib.blake2b(b"".join(parts), digest_size=16).digest()


def record(head: Head, buckets: list[bytes], nonce: bytes | None = None) -> bytes:
    """An open record of `head` and its buckets' fields (`bucket`), ending with `nonce`
    (`NONCE_BYTES` bytes; fresh random ones unless given)."""
    if len(buckets) > MAX_BUCKETS:
        raise ValueError(f"a record names at most {MAX_BUCKETS} buckets, got {len(buckets)}")
    if nonce is None:
        nonce = secrets.token_bytes(NONCE_BYTES)
    elif len(nonce) != NONCE_BYTES:
        raise ValueError(f"a record's nonce is {NONCE_BYTES} bytes, got {len(nonce)}")
    return b"".join(
        (
            _HEAD.pack(
                b"o",
                head.estimate,
                head.expires_at,
                1 if head.home else 0,
                head.hour,
                *head.tokens,
                head.created,
            ),
            text(head.binding),
            text(head.dims),
            text(head.ledger_index),
            text(head.groups),
            text(head.request_id),
            _COUNT.pack(len(buckets)),
            *buckets,
            nonce,
        )
    )


def fields(raw: bytes) -> tuple[str, int, str, int, int, bool]:
    """(state letter, estimate, dims, estimated input and output tokens, home) of a stored
    record: this layout's bytes, or the JSON array of the layout before."""
    if raw[:1] == b"[":
        body = json.loads(raw)
        return body[0], body[1], body[5], body[8], body[9], body[4] == 1
    state, estimate, _, home, _, tokens_in, tokens_out, _ = _HEAD.unpack_from(raw)
    offset = _HEAD.size
    texts: list[str] = []
    for _ in range(_TEXTS):
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        texts.append(raw[offset : offset + length].decode("utf-8"))
        offset += length
    return state.decode("ascii"), estimate, texts[1], tokens_in, tokens_out, home == 1
