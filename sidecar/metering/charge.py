"""The one rule for what a metered exchange costs, from what was seen of its response.

- A request that never reached the provider (the client went away while Envoy still held
  it, the upstream could not be reached): $0, counted in `errors`.
- An error status (4xx/5xx) without usage: $0, as providers bill errors (a 401 for a bad
  key, a 429, a 500; Envoy's own reply when the upstream could not be reached). The ledger
  counts it in `errors`. An error that reports usage pays that usage, by the rules below.
- The provider reported its final usage: usage times price, and everything it bills besides
  the top-level tokens (below).
- The response was cut short after some usage was reported (Anthropic's `message_start`):
  that usage, with the output raised to at least the text that streamed past.
- No usage at all (a provider that does not report it, a client that hung up before the
  usage event): the amount reserved at admission, or the text seen streaming past when that
  costs more (a call without an output limit reserves `default_max_output_tokens`, and may
  well produce more). Never a re-estimate, never $0 for a success.

Beyond the top-level tokens:

- Iterations (Anthropic's `usage.iterations`). When a response lists them, they are what is
  billed: each priced on its own (its own long-context tier) at its own model's rates. A
  `message` or `compaction` step runs on the request's model; an `advisor_message` names the
  advisor's model. A step of a type not known here is charged like the others (at the model
  it names, else the request's) and logged; a step naming a model without a price is charged
  at the request's model and logged. The top-level
  counts (which Anthropic documents as the sum of the non-compaction steps) still bound the
  charge from below: whatever they report beyond the sum of all steps is charged at the
  request's model, so a malformed or partial list can only add, never hide, spend.
- Per-call tool fees (web and file searches) at the request's model's fee rates.

All parts are summed in pico-dollars and rounded up to µUSD once. Parts charged to another
model get their share rounded down, the request's model the rest, so the parts add up to
the total exactly.

Text that streamed past is counted in UTF-8 bytes and turned into tokens at the same
4 bytes per token as the input estimate (`sidecar.pricing.text_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from sidecar.model import Iteration, TokenUsage, ToolFees
from sidecar.pricing import (
    PICO_PER_MICRO,
    UnitPrice,
    cost_micros,
    cost_pico,
    fees_pico,
    in_geo,
    pico_to_micros,
    text_tokens,
)

# Iteration types documented by Anthropic; others are charged the same way, and logged.
KNOWN_ITERATIONS = frozenset({"message", "compaction", "advisor_message"})

NO_FEES = ToolFees()

PriceOf = Callable[[str], UnitPrice | None]


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
    # Sampling steps the provider billed separately (Anthropic's usage.iterations).
    iterations: tuple[Iteration, ...] = ()
    fees: ToolFees = NO_FEES
    # False when the request never reached the provider (Envoy sent it no byte).
    reached_upstream: bool = True

    @property
    def error(self) -> bool:
        return self.status >= 400 or not self.reached_upstream


def charge_tokens(reserved: tuple[int, int], observed: Observed) -> tuple[int, int]:
    """(input, output) tokens charged to token budgets, by the same rule as the cost: none
    for an error without usage, the reported usage (output raised to the text seen when the
    report was cut short), else what was reserved, with the output raised to the text seen.
    (Request budgets count every request, errors included: providers count them too.)"""
    seen = text_tokens(observed.output_bytes)
    usage = observed.usage
    if usage is None and observed.error:
        return 0, 0
    if usage is not None and observed.complete:
        return usage.total_input, usage.output_tokens
    if usage is not None:
        return usage.total_input, max(usage.output_tokens, seen)
    return reserved[0], max(reserved[1], seen)


@dataclass(frozen=True, slots=True)
class Part:
    """Spend charged to a model other than the request's (an advisor)."""

    model: str
    cost: int  # µUSD
    tokens: TokenUsage


@dataclass(frozen=True, slots=True)
class Bill:
    total: int  # µUSD: what the budgets are charged
    # Tokens charged at the request's model; its share of the total is total - others.
    tokens: TokenUsage
    others: tuple[Part, ...] = ()
    # Iteration types not known here, and models an iteration named that have no price:
    # both were charged at the request's model, and are worth a log line.
    unknown_kinds: tuple[str, ...] = ()
    unpriced_models: tuple[str, ...] = ()


def bill(
    model: str, price: UnitPrice, price_of: PriceOf, reserved: int, observed: Observed
) -> Bill:
    """What to charge for an exchange whose reservation held `reserved` µUSD. `price` is the
    request's `model`'s; `price_of` prices any other model an iteration names."""
    seen = text_tokens(observed.output_bytes)
    usage = observed.usage
    if usage is None and observed.error:
        return Bill(0, TokenUsage())
    fees = fees_pico(price, observed.fees)
    geo = observed.fees.inference_geo
    if observed.iterations:
        return _bill_iterations(
            model, price, price_of, usage or TokenUsage(), observed.iterations, fees, geo
        )
    if usage is not None and observed.complete:
        return Bill(pico_to_micros(in_geo(cost_pico(price, usage), geo) + fees), usage)
    if usage is not None:
        raised = replace(usage, output_tokens=max(usage.output_tokens, seen))
        return Bill(pico_to_micros(in_geo(cost_pico(price, raised), geo) + fees), usage)
    if not seen:
        return Bill(reserved, TokenUsage())
    text = cost_micros(price, TokenUsage(input_tokens=observed.input_tokens, output_tokens=seen))
    return Bill(max(reserved, text + pico_to_micros(fees)), TokenUsage())


def _bill_iterations(
    request_model: str,
    price: UnitPrice,
    price_of: PriceOf,
    top: TokenUsage,
    steps: tuple[Iteration, ...],
    fees: int,
    geo: str,
) -> Bill:
    """Each step priced at its model, every step's tokens in the response's geography."""
    own = TokenUsage()
    own_pico = fees
    others: dict[str, tuple[int, TokenUsage]] = {}
    unknown: list[str] = []
    unpriced: list[str] = []
    for step in steps:
        model = "" if step.model == request_model else step.model
        if step.kind not in KNOWN_ITERATIONS:
            unknown.append(step.kind)
        other = price_of(model) if model else None
        if model and other is None:
            unpriced.append(model)
        if other is None:
            own += step.tokens
            own_pico += in_geo(cost_pico(price, step.tokens), geo)
            continue
        pico, tokens = others.get(model, (0, TokenUsage()))
        others[model] = (pico + in_geo(cost_pico(other, step.tokens), geo), tokens + step.tokens)
    shortfall = _shortfall(top, sum((step.tokens for step in steps), TokenUsage()))
    own += shortfall
    own_pico += in_geo(cost_pico(price, shortfall), geo)
    total = pico_to_micros(own_pico + sum(pico for pico, _ in others.values()))
    parts = tuple(
        Part(model, pico // PICO_PER_MICRO, tokens) for model, (pico, tokens) in others.items()
    )
    return Bill(total, own, parts, tuple(unknown), tuple(unpriced))


def _shortfall(top: TokenUsage, charged: TokenUsage) -> TokenUsage:
    """What the top-level counts report beyond the steps already charged, field by field."""
    pairs = zip(top.counts(), charged.counts(), strict=True)
    return TokenUsage(*(max(a - b, 0) for a, b in pairs))
