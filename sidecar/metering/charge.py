"""The one rule for what a metered exchange costs, from what was seen of its response.

- An error status (4xx/5xx) without usage: $0, as providers bill errors (a 401 for a bad
  key, a 429, a 500; Envoy's own reply when the upstream could not be reached). The ledger
  counts it in `errors`. An error that reports usage pays that usage, by the rules below.
- The provider reported its final usage: usage times price.
- The response was cut short after some usage was reported (Anthropic's `message_start`):
  that usage, with the output raised to at least the text that streamed past.
- No usage at all (a provider that does not report it, a client that hung up before the
  usage event): the amount reserved at admission, or the text seen streaming past when that
  costs more (a call without an output limit reserves `default_max_output_tokens`, and may
  well produce more). Never a re-estimate, never $0 for a success.

Text that streamed past is counted in UTF-8 bytes and turned into tokens at the same
4 bytes per token as the input estimate (`sidecar.pricing.text_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sidecar.model import TokenUsage
from sidecar.pricing import UnitPrice, cost_micros, text_tokens


@dataclass(frozen=True, slots=True)
class Observed:
    """What metering saw of one response."""

    usage: TokenUsage | None = None
    # The usage is the provider's final report for the whole response.
    complete: bool = False
    # UTF-8 bytes of generated text (and tool-call arguments) that passed to the client.
    output_bytes: int = 0
    # Estimated prompt tokens of the request, for pricing seen text when no usage came.
    input_tokens: int = 0
    # The response's HTTP status; 0 when none arrived (the exchange ended before it).
    status: int = 0

    @property
    def error(self) -> bool:
        return self.status >= 400


def charge_micros(price: UnitPrice, reserved: int, observed: Observed) -> int:
    """µUSD to charge for an exchange whose reservation held `reserved` µUSD."""
    seen = text_tokens(observed.output_bytes)
    usage = observed.usage
    if usage is None and observed.error:
        return 0
    if usage is not None and observed.complete:
        return cost_micros(price, usage)
    if usage is not None:
        return cost_micros(price, replace(usage, output_tokens=max(usage.output_tokens, seen)))
    if not seen:
        return reserved
    return max(reserved, cost_micros(price, TokenUsage(input_tokens=observed.input_tokens,
                                                       output_tokens=seen)))
