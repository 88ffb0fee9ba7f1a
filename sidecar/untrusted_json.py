"""Parse JSON that someone else wrote: every failure, nesting too deep included, is a
ValueError, so each reader's existing error path answers it (400, or "nothing usable")."""

from __future__ import annotations

import json
from typing import Any


class TooDeep(ValueError):
    """The document nests deeper than the parser's recursion allows."""


def loads(data: str | bytes) -> Any:
    try:
        return json.loads(data)
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
