"""Usage metering for the response path, plus the JSON readers its parsers share.

Entry point: `sidecar.metering.parse.UsageMeter`. Nothing here does I/O; provider JSON is
untrusted, so every reader answers None for a missing or mistyped value instead of raising.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from sidecar import untrusted_json


def count(value: object) -> int | None:
    """A token count from JSON, or None when absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return max(int(value), 0)


def mapping(value: object) -> Mapping[str, object] | None:
    # JSON objects are dicts: checked first, the ABC check costs several times more.
    return value if type(value) is dict or isinstance(value, Mapping) else None


def load_json(data: str | bytes) -> object:
    """Parse JSON, answering None for anything malformed: one bad event must not stop metering."""
    try:
        return untrusted_json.loads(data)
    except ValueError:
        return None


def utf8_len(value: object) -> int:
    """UTF-8 bytes of a string from JSON; 0 for anything else."""
    if not isinstance(value, str):
        return 0
    return len(value) if value.isascii() else len(value.encode("utf-8", "replace"))


# Keys under which providers put generated text, reasoning and tool-call arguments.
TEXT_KEYS = frozenset(
    {
        "content",
        "text",
        "thinking",
        "arguments",
        "refusal",
        "reasoning_content",
        "reasoning",
        "partial_json",
    }
)


def generated_text_bytes(root: object) -> int:
    """UTF-8 bytes of the generated text in a complete response body: every string under a
    `TEXT_KEYS` key, and tool inputs given as objects. Walks with an explicit stack: the
    nesting depth is the provider's to choose."""
    total = 0
    stack: list[tuple[str, object]] = [("", root)]
    while stack:
        key, item = stack.pop()
        if isinstance(item, str):
            if key in TEXT_KEYS:
                total += utf8_len(item)
        elif isinstance(item, Mapping):
            if key == "input" and item:
                # Anthropic tool_use input: the model generated it as JSON text.
                total += len(json.dumps(item, separators=(",", ":")))
                continue
            stack.extend((str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((key, v) for v in item)
    return total
