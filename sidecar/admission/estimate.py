"""What a request is expected to cost before it is made: the tokens its body asks for, and
their price at a candidate model. Token buckets hold the same estimate the price is made of."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.admission.candidates import Candidate
from sidecar.config.ruleset import RuleSet
from sidecar.metering.parse import Api, api_for_path
from sidecar.policy.request import BadRequest
from sidecar.pricing import (
    UnitPrice,
    estimate_input_tokens,
    estimate_micros,
    in_geo,
    requested_choices,
    requested_image_tokens,
    requested_output_tokens,
    requested_speech_tokens,
)

# Beyond any model's output (and the bound on `default_max_output_tokens`): such a limit is
# a mistake or an attack, refused before its estimate outgrows the store's integers.
MAX_OUTPUT_TOKENS = 10_000_000
# OpenAI's own bound on `n`; Gemini's on `candidateCount` is lower.
MAX_CHOICES = 128


def unlimited_call(path: str, body: Mapping[str, Any]) -> Api | None:
    """The API of a request whose output no limit in its body bounds: images (priced by
    their quality) or speech (by its text and pace); None for any other."""
    if "prompt" not in body and "voice" not in body:
        return None  # the usual call: no path to look at
    api = api_for_path(path)
    return api if api in ("openai_images", "openai_speech") else None


def requested_tokens(
    rs: RuleSet, body: Mapping[str, Any], api: Api | None = None
) -> tuple[int, int]:
    """(input, output): input from the body, output from its largest output limit (or, for
    an `unlimited_call`'s `api`, what an image of its quality draws, or the audio its text
    makes) times the answers it asks for (each may run to the limit, and each is billed)."""
    if api == "openai_images":
        output = requested_image_tokens(body)
    elif api == "openai_speech":
        output = requested_speech_tokens(body)
    else:
        output = requested_output_tokens(body, rs.default_max_output_tokens)
    if output > MAX_OUTPUT_TOKENS:
        raise BadRequest(f"the output limit must be at most {MAX_OUTPUT_TOKENS} tokens")
    choices = requested_choices(body)
    if choices > MAX_CHOICES:
        raise BadRequest(f"at most {MAX_CHOICES} answers may be asked for")
    return estimate_input_tokens(body), output * choices


def requested_geo(body: Mapping[str, Any]) -> str:
    """Where the body asks the model to run (Anthropic's `inference_geo`; "": anywhere)."""
    geo = body.get("inference_geo")
    return geo if isinstance(geo, str) else ""


def priced(
    rs: RuleSet, candidate: Candidate, tokens: tuple[int, int], geo: str = ""
) -> tuple[UnitPrice, int] | None:
    """The candidate's price and the µUSD estimate of `tokens` at it, as billed in `geo`;
    None when unpriced."""
    price = rs.prices.price(candidate.provider.pricing_id, candidate.model)
    if price is None:
        return None
    return price, in_geo(estimate_micros(price, *tokens), geo)
