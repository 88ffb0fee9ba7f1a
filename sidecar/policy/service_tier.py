"""Service tiers the price table cannot price: refused unless the operator opts in.

A request may ask for another tier of service in its body. OpenAI's `priority` (lately
"fast") processing bills 1.7 to 2 times the standard rates, depending on the model, and
genai-prices carries only the standard rates: charged those, a caller asking for priority
would spend up to twice what every budget counts. So a tier is admitted only when its price
is at most the standard one (what the charge uses): `auto` and `default` (the project's
tier, standard unless its owner changed it), `flex` (half price: charged the standard rate,
so over-counted, never under), Anthropic's `standard_only`. Anything else, including a
value spelled oddly or of the wrong type, is refused: a provider that accepts it may bill
it above standard. `admission.service_tiers: standard_price` admits every tier, each
charged at the standard price.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The body members that choose a tier (Gemini's REST API takes both spellings).
_TIER_FIELDS = ("service_tier", "serviceTier")
# Tiers billed at most at the standard rates, compared lower-case.
STANDARD_OR_CHEAPER = frozenset({"auto", "default", "standard", "standard_only", "flex"})


def unpriced_service_tier(body: Mapping[str, Any]) -> str | None:
    """Why the tier `body` asks for cannot be priced; None when it can (or none is named)."""
    for name in _TIER_FIELDS:
        tier = body.get(name)
        if tier is None:
            continue
        if isinstance(tier, str) and tier.lower() in STANDARD_OR_CHEAPER:
            continue
        shown = repr(tier)[:64]
        return (
            f"{name} {shown} is billed above the standard price, which is all the sidecar "
            "can charge: ask for the standard tier (or admission.service_tiers: standard_price)"
        )
    return None
