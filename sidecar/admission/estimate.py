"""What a request is expected to cost before it is made: the tokens its body asks for, and
their price at a candidate model. Token buckets hold the same estimate the price is made of."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.admission.candidates import Candidate
from sidecar.config.ruleset import RuleSet
from sidecar.pricing import (
    UnitPrice,
    estimate_input_tokens,
    estimate_micros,
    requested_output_tokens,
)


def requested_tokens(rs: RuleSet, body: Mapping[str, Any]) -> tuple[int, int]:
    """(input, output): input from the body, output from its largest output limit."""
    return (
        estimate_input_tokens(body),
        requested_output_tokens(body, rs.default_max_output_tokens),
    )


def priced(
    rs: RuleSet, candidate: Candidate, tokens: tuple[int, int]
) -> tuple[UnitPrice, int] | None:
    """The candidate's price and the µUSD estimate of `tokens` at it; None when unpriced."""
    price = rs.prices.price(candidate.provider.pricing_id, candidate.model)
    if price is None:
        return None
    return price, estimate_micros(price, *tokens)
