"""genai-prices' own price of a usage, to hold the sidecar's integer pricing against."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

from genai_prices import Usage, calc_price

from sidecar.model import TokenUsage


def genai_micros(
    usage: TokenUsage, model: str, provider_id: str, factor: Decimal = Decimal(1)
) -> int:
    """What genai-prices charges for `usage` (times `factor`, a surcharge it does not know),
    rounded up to µUSD once. Its counts include what TokenUsage keeps apart: cache tokens in
    the input, cached audio in the audio input."""
    total = calc_price(
        Usage(
            input_tokens=usage.total_input,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            input_audio_tokens=usage.input_audio_tokens + usage.cache_audio_read_tokens,
            cache_audio_read_tokens=usage.cache_audio_read_tokens,
            output_audio_tokens=usage.output_audio_tokens,
            input_image_tokens=usage.input_image_tokens,
            output_image_tokens=usage.output_image_tokens,
            input_video_tokens=usage.input_video_tokens,
            output_video_tokens=usage.output_video_tokens,
        ),
        model,
        provider_id=provider_id,
    ).total_price
    return int((total * factor * 1_000_000).to_integral_value(rounding=ROUND_CEILING))
