"""HTTP header text as every transport reads and writes it: repeated headers joined into one
value, and control characters kept out of values the sidecar passes on."""

from __future__ import annotations

import re
from collections.abc import Iterable

# Control characters (CR and LF among them): never valid in a header value or a request line.
UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def join_headers(
    pairs: Iterable[tuple[str, str]], into: dict[str, str] | None = None
) -> dict[str, str]:
    """Headers by lower-case name; a repeated header's values joined with commas, in order,
    as RFC 9110 allows, so no copy of it is silently dropped."""
    headers: dict[str, str] = {} if into is None else into
    for raw_name, value in pairs:
        name = raw_name.lower()
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers


def clean(value: str) -> str:
    """`value` with each control character replaced by a space."""
    return UNSAFE.sub(" ", value)
