"""Service tiers the price table cannot price: refused unless the operator opts in.

A request may ask in its body for a level of service billed above the standard rates, and
genai-prices carries only the standard rates: charged those, a caller would spend several
times what every budget counts. OpenAI's `service_tier: "priority"` (lately `"fast"`)
bills 1.7 to 2 times standard, by model; Anthropic's `speed: "fast"` about 3 to 6 times;
Bedrock's `serviceTier: {"type": "priority"}` and `performanceConfig: {"latency":
"optimized"}` more than standard too. So a level is admitted only when its price is at
most the standard one (what the charge uses): for a tier, `auto` and `default` (the
project's tier, standard unless its owner changed it), `flex` (half price: charged the
standard rate, so over-counted, never under), `standard` and Anthropic's `standard_only`;
for a speed or a latency, `standard`. Anything else, a value spelled oddly or of the wrong
type included, is refused: a provider that accepts it may bill it above standard.
`admission.service_tiers: standard_price` admits every level, each charged at the
standard price.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.metering.parse import api_for_path

# Tiers billed at most at the standard rates, compared lower-case.
STANDARD_OR_CHEAPER = frozenset({"auto", "default", "standard", "standard_only", "flex"})
_STANDARD = frozenset({"standard"})
# (member, nested member or None, what it may be): Gemini's REST API takes both spellings
# of a name; Bedrock's Converse API writes its tier as an object, `{"type": ...}`.
_LEVELS: tuple[tuple[str, str | None, frozenset[str]], ...] = (
    ("service_tier", None, STANDARD_OR_CHEAPER),
    ("serviceTier", "type", STANDARD_OR_CHEAPER),
    ("speed", None, _STANDARD),
    ("performanceConfig", "latency", _STANDARD),
)


def unpriced_service_tier(body: Mapping[str, Any], path: str = "") -> str | None:
    """Why the level of service `body` asks for cannot be priced; None when it can (or
    none is named). `path`: the request's, after its provider's prefix."""
    for name, nested, allowed in _LEVELS:
        value = body.get(name)
        if value is None:
            continue
        if name == "speed" and _speech_pace(value, path):
            continue
        shown = name
        if nested is not None and isinstance(value, dict):
            value, shown = value.get(nested), f"{name}.{nested}"
            if value is None:
                continue
        if isinstance(value, str) and value.lower() in allowed:
            continue
        return (
            f"{shown} {repr(value)[:64]} is billed above the standard price, which is all "
            "the sidecar can charge: ask for the standard level of service "
            "(or admission.service_tiers: standard_price)"
        )
    return None


def _speech_pace(value: object, path: str) -> bool:
    """Whether `speed` is the pace of a voice (OpenAI's speech API: a number from 0.25 to
    4), which is no level of service: slower speech is longer audio, and the audio is
    what is billed."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and api_for_path(f"/{path.lower()}") == "openai_speech"
    )
