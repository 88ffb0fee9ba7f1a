"""A reservation's record on one Redis shard, as bytes: written here, read by the Lua scripts.

The record (budget_lib.lua documents it) is packed with `struct`, in formats Lua's struct
library reads back in one call: a fixed head, then ten fields per bucket. Numbers travel
as 64-bit integers and doubles, so a script reads them without parsing any text (a JSON
record cost a commit a third of its time in cjson and tonumber). Strings are prefixed with
their length. The first byte is the state letter, the one byte a finish rewrites.

Records written before this layout are JSON arrays (they begin with "["); they are still
read, here and in Lua, until they expire.
"""

from __future__ import annotations

import json
import struct
from typing import NamedTuple

# Lua's formats (budget_lib.lua HEAD and ENTRY) are the same, with its `c0` strings after
# their `i4` lengths.
_HEAD = struct.Struct(">cqdbqqqd")  # state, estimate, expires_at, home, hour, tokens, created
_TEXTS = 5  # binding, dims JSON, ledger index key, other groups' tags, request id
_LENGTH = struct.Struct(">i")
_COUNT = struct.Struct(">h")
_BUCKET = struct.Struct(">qqqqqbq")  # slot, since, ttl, estimate, held, enforced, limit

# Buckets one record may name: its count is a signed 16-bit field.
MAX_BUCKETS = 32_767


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


def record(head: Head, buckets: list[bytes]) -> bytes:
    """An open record of `head` and its buckets' fields (`bucket`)."""
    if len(buckets) > MAX_BUCKETS:
        raise ValueError(f"a record names at most {MAX_BUCKETS} buckets, got {len(buckets)}")
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
