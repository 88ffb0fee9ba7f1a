"""Usage metering for the response path, plus the JSON readers its parsers share.

Entry point: `sidecar.metering.parse.UsageMeter`. Nothing here does I/O; provider JSON is
untrusted, so every reader answers None for a missing or mistyped value instead of raising.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping


def count(value: object) -> int | None:
    """A token count from JSON, or None when absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return max(int(value), 0)


def mapping(value: object) -> Mapping[str, object] | None:
    return value if isinstance(value, Mapping) else None


def load_json(data: str | bytes) -> object:
    """Parse JSON, answering None for anything malformed: one bad event must not stop metering."""
    try:
        return json.loads(data)
    except ValueError:
        return None
