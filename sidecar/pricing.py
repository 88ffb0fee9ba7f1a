"""Model prices as integer pico-dollars per token: config overrides, then genai-prices' data.

Prices come from the data bundled with the `genai-prices` package and nothing else: the
package only touches the network through its `UpdatePrices` background task, which is never
started here, and lookups go through a private snapshot built from the bundled data, so even a
snapshot installed process-wide by someone else is not used.

A price in USD per million tokens, times 1_000_000, is exactly pico-dollars per token; tokens
times pico-dollars, divided by 1_000_000, is µUSD. All cost arithmetic is on integers and rounds
once, up.

How genai-prices' richer price model is reduced to four per-token rates:

- Tiered prices (Gemini and Claude long-context rates) use genai-prices' cliff semantics: once a
  request's total input tokens (cache tokens included) exceed a tier's start, every token of the
  request is billed at that tier. `UnitPrice`'s own rates are the highest tier, which is what
  estimates use: the input estimate is a heuristic, and landing below a threshold when the
  real request lands above it would under-reserve the whole request, not just the excess.
  Actual costs pick the tier from a table cached in `UnitPrice.tiers` (integers, about a
  microsecond) rather than calling `genai_prices.calc_price` (Decimal, about 110 µs); the two
  agree, which the tests check.
- Time-of-day prices (DeepSeek's off-peak discounts) take the highest rate of the day, so
  off-peak discounts are not passed on: spend is never under-counted.
- Prices with a start date are resolved at lookup time; the cache is dropped when the next
  known start date arrives, so a scheduled price change takes effect without a restart.
- Request-dependent variants (service tiers, batch) are not applied: the standard price is used.
  Tiers billed above it are refused at admission (sidecar/policy/service_tier.py).
- A cache read or write without its own rate costs the input rate (genai-prices bills such
  tokens as plain input). Anthropic's 1-hour cache writes have their own rate; without one
  they cost the 5-minute write rate.
- Audio tokens (a part of the input, output and cache-read counts) cost the model's audio
  rates, as text when it has none; cached audio costs its own rate, else the audio input
  rate when only audio is priced, the cache-read rate when only reads are, the higher of the
  two when both are (where genai-prices itself refuses to choose). Image and video tokens
  cost the model's image and video rates likewise; cached images cost the cache-read rate.
- Server-tool fees (web searches, file searches) are genai-prices' per-1,000 prices, kept as
  pico-dollars per call. They are not tiered. A configured override keeps genai-prices' fees
  for the model when genai-prices knows it, and has none otherwise.
- A model without an input-token price (priced per image, per second, ...) counts as unpriced,
  so `pricing.unknown_model` decides rather than billing $0. A model without an output price
  (embeddings) bills output at 0.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from datetime import time as dtime
from decimal import ROUND_CEILING, Decimal
from typing import Any, Literal

from genai_prices import types as gp_types
from genai_prices.data_snapshot import DataSnapshot

from sidecar.config.models import PriceOverrideConfig
from sidecar.model import TokenUsage, ToolFees

PriceSource = Literal["genai-prices", "override", "default"]

PICO_PER_MICRO = 1_000_000
# USD per million tokens → pico-dollars per token.
_PICO_PER_USD_PER_MTOK = 1_000_000
_CACHE_ENTRIES = 4096

_PRICE_KEYS = (
    "input_mtok",
    "output_mtok",
    "cache_read_mtok",
    "cache_write_mtok",
    "cache_write_1h_mtok",
    "input_audio_mtok",
    "output_audio_mtok",
    "cache_audio_read_mtok",
    "input_image_mtok",
    "output_image_mtok",
    "input_video_mtok",
    "output_video_mtok",
)
# USD per 1,000 calls (genai-prices' `*_kcount` prices) → pico-dollars per call.
_PICO_PER_USD_PER_KCALL = 1_000_000_000

# Estimation heuristics. UTF-8 bytes rather than characters: the same for English, and closer
# to the token count of non-Latin scripts, where a character is often a whole token.
BYTES_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4
_TOKENS_PER_REQUEST = 3
# Anthropic's ceiling for one image (about 1.15 megapixels); OpenAI's high-detail tiles of a
# typical image come in under it. Image bytes say little about tokens, so they are not counted.
_TOKENS_PER_IMAGE = 1_600
_IMAGE_PART_TYPES = frozenset({"image", "image_url", "input_image"})
_PROMPT_FIELDS = (
    "system",
    "instructions",
    "messages",
    "input",
    "prompt",
    "tools",
    "functions",
    # Gemini (its REST API takes both spellings).
    "contents",
    "systemInstruction",
    "system_instruction",
)
_MESSAGE_LISTS = ("messages", "input", "contents")
_MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Output limits nested in a settings object: Gemini's `generationConfig.maxOutputTokens`,
# Bedrock Converse's `inferenceConfig.maxTokens`.
_NESTED_MAX_TOKENS = (
    ("generationConfig", "maxOutputTokens"),
    ("generation_config", "max_output_tokens"),
    ("inferenceConfig", "maxTokens"),
)
_CHOICE_FIELDS = ("n", "best_of")
_NESTED_CHOICES = (
    ("generationConfig", "candidateCount"),
    ("generation_config", "candidate_count"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModalityRates:
    """Rates of audio, image and video tokens; None: the text rate (cached audio: the
    cache-read rate). Keyword-only, so they follow each price's own fields."""

    input_audio: int | None = None
    output_audio: int | None = None
    cache_audio_read: int | None = None
    input_image: int | None = None
    output_image: int | None = None
    input_video: int | None = None
    output_video: int | None = None


@dataclass(frozen=True, slots=True)
class PriceTier(ModalityRates):
    """Rates for requests whose total input tokens (cache included) are at most `up_to`."""

    up_to: int
    input: int
    output: int
    cache_read: int
    cache_write: int
    # None: the same as cache_write.
    cache_write_1h: int | None = None


@dataclass(frozen=True, slots=True)
class UnitPrice(ModalityRates):
    """Pico-dollars per token. For tiered models these are the highest tier's rates and
    `tiers` holds the lower ones in ascending `up_to` order."""

    input: int
    output: int
    cache_read: int
    cache_write: int
    source: PriceSource
    tiers: tuple[PriceTier, ...] = ()
    cache_write_1h: int | None = None
    # Pico-dollars per server-tool call.
    web_search: int = 0
    file_search: int = 0


# A configured price (`pricing.overrides[]`), validated when the file is loaded: `provider`
# and `model` are fnmatch globs, matched case-insensitively against genai-prices' provider id
# and the request's model.
PriceOverride = PriceOverrideConfig


def _override_matches(override: PriceOverride, provider_id: str, model: str) -> bool:
    return fnmatch.fnmatchcase(provider_id.lower(), override.provider.lower()) and (
        fnmatch.fnmatchcase(model.lower(), override.model.lower())
    )


def override_price(override: PriceOverride) -> UnitPrice:
    input_rate = per_mtok_to_pico(override.input_per_mtok)
    return UnitPrice(
        input=input_rate,
        output=per_mtok_to_pico(override.output_per_mtok),
        cache_read=_or_rate(override.cache_read_per_mtok, input_rate),
        cache_write=_or_rate(override.cache_write_per_mtok, input_rate),
        source="override",
    )


def per_mtok_to_pico(usd_per_mtok: Decimal | int | str) -> int:
    """USD per million tokens → whole pico-dollars per token, rounding fractions up."""
    amount = Decimal(usd_per_mtok) if not isinstance(usd_per_mtok, Decimal) else usd_per_mtok
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"not a price: {usd_per_mtok!r}")
    return int((amount * _PICO_PER_USD_PER_MTOK).to_integral_value(rounding=ROUND_CEILING))


def _or_rate(usd_per_mtok: Decimal | None, fallback: int) -> int:
    return fallback if usd_per_mtok is None else per_mtok_to_pico(usd_per_mtok)


class PriceBook:
    """Answers "what does this model cost?" in one cached lookup per (provider, model).

    Built off the request path (at config load), which is also when genai-prices' data is first
    imported (about 0.3 s).
    """

    def __init__(
        self,
        overrides: Sequence[PriceOverride],
        unknown_model: UnitPrice | None,
        *,
        clock: Callable[[], float] = time.time,
        cache_entries: int = _CACHE_ENTRIES,
    ) -> None:
        self._overrides = tuple(overrides)
        self._unknown_model = unknown_model
        self._clock = clock
        self._refresh_at = math.inf
        self._cached = functools.lru_cache(maxsize=cache_entries)(self._resolve)
        self._canonical = functools.lru_cache(maxsize=cache_entries)(self._resolve_name)
        _bundled_snapshot()

    def price(self, provider_id: str, model: str) -> UnitPrice | None:
        """The price of `model` at genai-prices' `provider_id`; None means reject as unpriced."""
        if self._clock() >= self._refresh_at:
            self._refresh_at = math.inf
            self._cached.cache_clear()
        return self._cached(provider_id, model)

    def canonical(self, provider_id: str, model: str) -> str:
        """The one name of `model` that policy compares and budgets count under: the model
        genai-prices resolves it to (`GPT-4O` and `gpt-4o-2024-08-06` are `gpt-4o`), else
        the name itself; lower-case either way. A config override prices a name but does not
        rename it: a snapshot with its own price still counts as the model it is a snapshot
        of, so a rule about `gpt-4o` covers it."""
        return self._canonical(provider_id, model)

    def _resolve_name(self, provider_id: str, model: str) -> str:
        name = model.strip().lower()
        info = _lookup_model(provider_id, name)
        return info.id.lower() if info is not None else name

    def _resolve(self, provider_id: str, model: str) -> UnitPrice | None:
        info = _lookup_model(provider_id, model)
        now = datetime.fromtimestamp(self._clock(), UTC)
        candidates = _candidate_prices(info, now) if info is not None else []
        for override in self._overrides:
            if _override_matches(override, provider_id, model):
                web_search, file_search = _fee_rates(candidates)
                return replace(
                    override_price(override), web_search=web_search, file_search=file_search
                )
        if info is None:
            return self._unknown_model
        next_change = _next_price_change(info, now.date())
        if next_change is not None:
            self._refresh_at = min(self._refresh_at, next_change)
        return _unit_price(candidates)


def cost_micros(price: UnitPrice, usage: TokenUsage) -> int:
    """The actual cost of `usage` in µUSD, rounded up; the tier follows the total input."""
    return _ceil_div(cost_pico(price, usage), PICO_PER_MICRO)


def cost_pico(price: UnitPrice, usage: TokenUsage) -> int:
    """The exact cost of `usage` in pico-dollars; the tier follows the total input."""
    total_input = usage.total_input
    rates: UnitPrice | PriceTier = price
    for tier in price.tiers:
        if total_input <= tier.up_to:
            rates = tier
            break
    one_hour = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
    one_hour_rate = rates.cache_write if rates.cache_write_1h is None else rates.cache_write_1h
    text = (
        usage.input_tokens * rates.input
        + usage.output_tokens * rates.output
        + usage.cache_read_tokens * rates.cache_read
        + (usage.cache_write_tokens - one_hour) * rates.cache_write
        + one_hour * one_hour_rate
    )
    if usage.has_modalities:
        return text + _modality_surcharge(rates, usage)
    return text


# The parts of the input and of the output that other modalities make up: (count, rate).
_INPUT_PARTS = (
    ("input_audio_tokens", "input_audio"),
    ("input_image_tokens", "input_image"),
    ("input_video_tokens", "input_video"),
)
_OUTPUT_PARTS = (
    ("output_audio_tokens", "output_audio"),
    ("output_image_tokens", "output_image"),
    ("output_video_tokens", "output_video"),
)


def _modality_surcharge(rates: UnitPrice | PriceTier, usage: TokenUsage) -> int:
    """What the audio, image and video parts of `usage` cost beyond the text rates they
    were counted at, at the model's own rates for them (see `_candidate_rates`); a price
    without such rates (an override) bills them as text. The parts together never count
    more tokens than the total they are part of."""
    extra = 0
    for parts, total, base in (
        (_INPUT_PARTS, usage.input_tokens, rates.input),
        (_OUTPUT_PARTS, usage.output_tokens, rates.output),
    ):
        left = total
        for count_name, rate_name in parts:
            tokens = min(getattr(usage, count_name), left)
            rate = getattr(rates, rate_name)
            if tokens and rate is not None:
                extra += tokens * (rate - base)
            left -= tokens
    cached = min(usage.cache_audio_read_tokens, usage.cache_read_tokens)
    if cached and rates.cache_audio_read is not None:
        extra += cached * (rates.cache_audio_read - rates.cache_read)
    return extra


# Anthropic bills inference kept in the United States (`inference_geo: "us"`) at 1.1x on
# every token category (Claude 4.6 and later); genai-prices carries the global rates only.
# Responses of models without a choice of geography say "not_available" (seen in recorded
# Claude Sonnet 4.5 responses) and are billed at the global rates. A geography this table
# does not know is charged as the dearest one it does: over-counted, never under.
_GEO_SURCHARGES = {"us": (11, 10)}
_DEAREST_GEO = max(_GEO_SURCHARGES.values(), key=lambda ratio: ratio[0] / ratio[1])
_STANDARD_GEOS = frozenset({"", "global", "not_available"})


def geo_surcharge(geo: str) -> tuple[int, int]:
    """(numerator, denominator) of what tokens run in `geo` cost against the global rates."""
    key = geo.strip().lower()
    if key in _STANDARD_GEOS:
        return 1, 1
    return _GEO_SURCHARGES.get(key, _DEAREST_GEO)


def in_geo(amount: int, geo: str) -> int:
    """`amount` (pico- or micro-dollars of tokens) as billed in `geo`, rounded up."""
    numerator, denominator = geo_surcharge(geo)
    return amount if numerator == denominator else _ceil_div(amount * numerator, denominator)


def fees_pico(price: UnitPrice, fees: ToolFees) -> int:
    """Server-tool fees in pico-dollars."""
    return fees.web_searches * price.web_search + fees.file_searches * price.file_search


def pico_to_micros(pico: int) -> int:
    """Pico-dollars → µUSD, rounded up (done once per request)."""
    return _ceil_div(pico, PICO_PER_MICRO)


def estimate_micros(price: UnitPrice, input_tokens: int, output_tokens: int) -> int:
    """A reservation in µUSD at the highest tier's rates, rounded up."""
    return _ceil_div(input_tokens * price.input + output_tokens * price.output, PICO_PER_MICRO)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def estimate_input_tokens(body: Mapping[str, Any]) -> int:
    """A deterministic, deliberately generous prompt-token estimate for OpenAI chat, OpenAI
    Responses, Anthropic messages, Gemini and Bedrock Converse bodies.

    Every string under the prompt fields counts, role names and tool definitions included:
    counting a little too much costs a slightly larger reservation, counting too little lets
    concurrent requests overshoot a budget.
    """
    text_bytes = 0
    images = 0
    messages = 0
    for field_name in _PROMPT_FIELDS:
        value = body.get(field_name)
        if value is None:
            continue
        if field_name in _MESSAGE_LISTS and isinstance(value, list):
            messages += len(value)
        field_bytes, field_images = _measure(value)
        text_bytes += field_bytes
        images += field_images
    return (
        _ceil_div(text_bytes, BYTES_PER_TOKEN)
        + messages * _TOKENS_PER_MESSAGE
        + images * _TOKENS_PER_IMAGE
        + _TOKENS_PER_REQUEST
    )


def _measure(root: object) -> tuple[int, int]:
    """UTF-8 bytes of all strings under `root` and the number of image parts.

    Walks with an explicit stack: a client controls the nesting depth.
    """
    text_bytes = 0
    images = 0
    stack: list[object] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            text_bytes += len(item) if item.isascii() else len(item.encode("utf-8", "replace"))
        elif isinstance(item, Mapping):
            if item.get("type") in _IMAGE_PART_TYPES:
                images += 1
            else:
                stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return text_bytes, images


def requested_output_tokens(body: Mapping[str, Any], default: int) -> int:
    """The output-token ceiling the request asked for, else `default`.

    The largest limit the body names wins: a provider honours the one its API reads, and a
    client must not get a small reservation by naming a small limit under another name
    (`{"max_tokens": 1, "max_completion_tokens": 2000}`).
    """
    named: list[object] = [body.get(name) for name in _MAX_TOKENS_FIELDS]
    for outer, inner in _NESTED_MAX_TOKENS:
        settings = body.get(outer)
        if isinstance(settings, Mapping):
            named.append(settings.get(inner))
    limits = [n for n in map(_count, named) if n > 0]
    return max(limits) if limits else default


# Output tokens per image of OpenAI's gpt-image models, by quality, at the largest size
# (OpenAI's image generation guide, gpt-image-1: 1024x1536 draws 408, 1,584 and 6,240);
# any other quality ("auto", none) as high. Each partial image of a stream draws 100 more.
_IMAGE_OUTPUT_TOKENS = {"low": 408, "medium": 1584, "high": 6240}
_PARTIAL_IMAGE_TOKENS = 100


def requested_image_tokens(body: Mapping[str, Any]) -> int:
    """The output tokens one image of an images API request may draw: the images API takes
    no output limit, its quality and size bound what an image costs."""
    quality = body.get("quality")
    named = quality.strip().lower() if isinstance(quality, str) else ""
    per_image = _IMAGE_OUTPUT_TOKENS.get(named, _IMAGE_OUTPUT_TOKENS["high"])
    return per_image + _PARTIAL_IMAGE_TOKENS * max(_count(body.get("partial_images")), 0)


# Audio tokens a speech model speaks per UTF-8 byte of its input at speed 1, generously:
# OpenAI prices gpt-4o-mini-tts at about $0.015 a minute, 1,250 audio tokens at $12 per
# million, and a minute of speech is about 900 characters (1.4 tokens a character). A
# slower `speed` (down to 0.25) speaks the same text for longer.
_SPEECH_TOKENS_PER_BYTE = 2
_SLOWEST_SPEECH = 0.25


def requested_speech_tokens(body: Mapping[str, Any]) -> int:
    """The audio tokens a speech request may draw: the speech API takes no output limit,
    its text and speed bound how long the audio runs."""
    text = body.get("input")
    text_bytes = _measure(text)[0] if isinstance(text, str) else 0
    speed = body.get("speed", 1)
    try:
        pace = float(speed) if not isinstance(speed, bool) else _SLOWEST_SPEECH
    except (TypeError, ValueError):
        pace = _SLOWEST_SPEECH
    # Anything that is not a pace the provider accepts is counted as the slowest one.
    if not _SLOWEST_SPEECH <= pace <= 4.0:
        pace = _SLOWEST_SPEECH
    return math.ceil(_SPEECH_TOKENS_PER_BYTE * max(text_bytes, 1) / pace)


def requested_choices(body: Mapping[str, Any]) -> int:
    """How many answers the request asks the model for, each up to the output limit: OpenAI's
    `n` (and the legacy `best_of`, all of which are billed), Gemini's `candidateCount`."""
    named: list[object] = [body.get(name) for name in _CHOICE_FIELDS]
    for outer, inner in _NESTED_CHOICES:
        settings = body.get(outer)
        if isinstance(settings, Mapping):
            named.append(settings.get(inner))
    return max([1, *map(_count, named)])


def _count(value: object) -> int:
    """A JSON count: an integer, or a float with an integral value (`2000.0`, which a
    lenient provider reads as 2000); anything else 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return 0


def text_tokens(text_bytes: int) -> int:
    """Tokens in `text_bytes` of generated text, at the estimate's bytes-per-token figure."""
    return _ceil_div(text_bytes, BYTES_PER_TOKEN)


@functools.cache
def _bundled_snapshot() -> DataSnapshot:
    # Imported here because the data module takes about 0.3 s to load.
    from genai_prices.data import providers

    return DataSnapshot(providers=providers, from_auto_update=False)


def _lookup_model(provider_id: str, model: str) -> gp_types.ModelInfo | None:
    """genai-prices' model for `model` at `provider_id`, else wherever the model name matches."""
    snapshot = _bundled_snapshot()
    provider_ids = (provider_id, None) if provider_id else (None,)
    for candidate in provider_ids:
        try:
            return snapshot.find_provider_model(model, None, candidate, None)[1]
        except LookupError:
            continue
    return _model_by_id(provider_id, model)


def _model_by_id(provider_id: str, model: str) -> gp_types.ModelInfo | None:
    """genai-prices' model whose id is `model`. Some ids do not match their own patterns
    (Bedrock's `regional.anthropic.claude-...` only matches `us.anthropic.claude-...` and
    the like), and a canonical name must still find its price."""
    name = model.strip().lower()
    for provider in _bundled_snapshot().providers:
        if provider.id != provider_id:
            continue
        for info in provider.models:
            if info.id.lower() == name:
                return info
    return None


def _candidate_prices(info: gp_types.ModelInfo, now: datetime) -> list[gp_types.ModelPrice]:
    """The prices the model can have today: the one genai-prices selects by date, plus every
    time-of-day price that may take precedence over it at some hour."""
    if isinstance(info.prices, gp_types.ModelPrice):
        return [info.prices]
    candidates: list[gp_types.ModelPrice] = []
    # Later entries take precedence, as in genai-prices' ModelInfo.get_prices.
    for conditional in reversed(info.prices):
        constraint = conditional.constraint
        if isinstance(constraint, gp_types.TimeOfDateConstraint):
            candidates.append(conditional.prices)
        elif constraint is None or constraint.active(now):
            candidates.append(conditional.prices)
            return candidates
    candidates.append(info.prices[0].prices)
    return candidates


def _next_price_change(info: gp_types.ModelInfo, today: date) -> float | None:
    """Unix time of the next dated price change (UTC midnight, as genai-prices reads dates)."""
    if isinstance(info.prices, gp_types.ModelPrice):
        return None
    upcoming = [
        c.constraint.start_date
        for c in info.prices
        if isinstance(c.constraint, gp_types.StartDateConstraint)
        and c.constraint.start_date > today
    ]
    if not upcoming:
        return None
    return datetime.combine(min(upcoming), dtime(0, tzinfo=UTC)).timestamp()


PriceValue = Decimal | gp_types.TieredPrices | None
# Pico-dollars per token, by PriceTier's field names.
Rates = dict[str, int]


def _unit_price(candidates: Sequence[gp_types.ModelPrice]) -> UnitPrice | None:
    values = [{key: _price_value(price, key) for key in _PRICE_KEYS} for price in candidates]
    if any(v["input_mtok"] is None for v in values):
        return None
    thresholds = sorted(
        {tier.start for v in values for value in v.values() for tier in _tiers(value)}
    )
    tiers = tuple(PriceTier(limit, **_rates_at(values, limit)) for limit in thresholds)
    top = thresholds[-1] + 1 if thresholds else 0
    web_search, file_search = _fee_rates(candidates)
    return UnitPrice(
        **_rates_at(values, top),
        source="genai-prices",
        tiers=tiers,
        web_search=web_search,
        file_search=file_search,
    )


def _fee_rates(candidates: Sequence[gp_types.ModelPrice]) -> tuple[int, int]:
    """Pico-dollars per web search and per file search: the highest candidate's, 0 when
    genai-prices has no such price."""
    return _fee_rate(candidates, "web_searches_kcount"), _fee_rate(
        candidates, "storage_searches_kcount"
    )


def _fee_rate(candidates: Sequence[gp_types.ModelPrice], key: str) -> int:
    found = [v for price in candidates if isinstance(v := getattr(price, key, None), Decimal)]
    if not found:
        return 0
    # USD per 1,000 calls is a thousand times fewer pico-dollars per call than per token.
    return per_mtok_to_pico(max(found)) * (_PICO_PER_USD_PER_KCALL // _PICO_PER_USD_PER_MTOK)


def _price_value(price: gp_types.ModelPrice, key: str) -> PriceValue:
    value = getattr(price, key)
    if value is None or isinstance(value, Decimal | gp_types.TieredPrices):
        return value
    raise TypeError(f"unexpected genai-prices value for {key}: {value!r}")


def _tiers(value: PriceValue) -> Iterable[gp_types.Tier]:
    return value.tiers if isinstance(value, gp_types.TieredPrices) else ()


def _rates_at(values: Sequence[Mapping[str, PriceValue]], total_input: int) -> Rates:
    """Pico rates for a request of `total_input` tokens: per rate, the highest candidate."""
    rates = [_candidate_rates(v, total_input) for v in values]
    return {name: max(r[name] for r in rates) for name in rates[0]}


def _candidate_rates(value: Mapping[str, PriceValue], total_input: int) -> Rates:
    input_rate = per_mtok_to_pico(_rate(value["input_mtok"], total_input) or 0)
    output = _rate(value["output_mtok"], total_input)
    cache_read = _rate(value["cache_read_mtok"], total_input)
    cache_write = _rate(value["cache_write_mtok"], total_input)
    cache_write_1h = _rate(value["cache_write_1h_mtok"], total_input)
    write_rate = input_rate if cache_write is None else per_mtok_to_pico(cache_write)
    output_rate = 0 if output is None else per_mtok_to_pico(output)
    read_rate = input_rate if cache_read is None else per_mtok_to_pico(cache_read)
    # Audio without its own rate is billed as text. Cached audio without its own rate is
    # billed as audio when only audio has a rate, as a cache read when only reads have one;
    # with both, genai-prices refuses to choose, and the higher is taken.
    audio_in = _rate(value["input_audio_mtok"], total_input)
    input_audio = _or_rate(audio_in, input_rate)
    output_audio = _or_rate(_rate(value["output_audio_mtok"], total_input), output_rate)
    cached_audio = _rate(value["cache_audio_read_mtok"], total_input)
    if cached_audio is not None:
        cached_audio_rate = per_mtok_to_pico(cached_audio)
    elif audio_in is None:
        cached_audio_rate = read_rate
    elif cache_read is None:
        cached_audio_rate = input_audio
    else:
        cached_audio_rate = max(read_rate, input_audio)
    return {
        "input": input_rate,
        "output": output_rate,
        "cache_read": read_rate,
        "cache_write": write_rate,
        "cache_write_1h": write_rate
        if cache_write_1h is None
        else per_mtok_to_pico(cache_write_1h),
        "input_audio": input_audio,
        "output_audio": output_audio,
        "cache_audio_read": cached_audio_rate,
        # Image and video without their own rates are billed as text.
        "input_image": _or_rate(_rate(value["input_image_mtok"], total_input), input_rate),
        "output_image": _or_rate(_rate(value["output_image_mtok"], total_input), output_rate),
        "input_video": _or_rate(_rate(value["input_video_mtok"], total_input), input_rate),
        "output_video": _or_rate(_rate(value["output_video_mtok"], total_input), output_rate),
    }


def _rate(value: PriceValue, total_input: int) -> Decimal | None:
    """genai-prices' calc_unit_price rule: the last tier whose start is exceeded applies."""
    if not isinstance(value, gp_types.TieredPrices):
        return value
    rate = value.base
    for tier in value.tiers:
        if total_input > tier.start:
            rate = tier.price
    return rate
