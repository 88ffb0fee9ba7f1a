"""Parse JSON that someone else wrote: every failure, nesting too deep included, is a
ValueError, so each reader's existing error path answers it (400, or "nothing usable")."""

from __future__ import annotations

import json
from typing import Any


class TooDeep(ValueError):
    """The document nests deeper than the parser's recursion allows."""


class DuplicateKey(ValueError):
    """An object names the same member twice."""

    def __init__(self, key: str) -> None:
        # The name is the client's own, shown back to it: cut, as it may be any length.
        shown = key if len(key) <= 64 else key[:64] + "..."
        super().__init__(f"the member {shown!r} appears twice in one object")
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return data


# Built once: json.loads with a hook builds a decoder on every call.
_UNIQUE = json.JSONDecoder(object_pairs_hook=_unique)


def loads(data: str | bytes, *, unique_keys: bool = False) -> Any:
    """`unique_keys`: refuse an object naming a member twice (DuplicateKey). For what a
    client sends that someone else reads too: parsers disagree on which of two `model`s
    counts (Python's json and most keep the last, some the first, some refuse), so a body
    with two could be judged by one and served by the other."""
    try:
        if not unique_keys:
            return json.loads(data)
        if isinstance(data, bytes | bytearray):
            # As json.loads reads bytes: UTF-8, -16 or -32 by the first bytes.
            data = data.decode(json.detect_encoding(data), "surrogatepass")
        return _UNIQUE.decode(data)
    except RecursionError:
        # json's C scanner recurses once per level; a body of a few kilobytes of `[` is
        # enough to exhaust the interpreter's stack, which would otherwise surface as an
        # internal error (a 500, or a 503 from Envoy) instead of the client's mistake.
        raise TooDeep("JSON nested too deeply") from None


def dumps_compact(data: Any) -> bytes | None:
    """Compact UTF-8 JSON of a parsed document, or None when it is too deep to write back."""
    try:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    except RecursionError:
        return None
