"""OpenAI's images API (gpt-image models) is metered from the usage its answers end with.

Its bodies are megabytes of base64 images with `usage` as the last member; a stream's
`image_generation.completed` event likewise. Unread, an image was charged its reservation,
which counted 1,024 output tokens where a high-quality image draws up to 6,240 (at $40
per million for gpt-image-1): a quarter of its price.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from devtools.fake_provider import expected_usage
from devtools.fake_provider.openai import images_frames, images_json
from sidecar.admission.estimate import unlimited_call
from sidecar.metering.openai import closing_usage, images_body_usage
from sidecar.metering.parse import UsageMeter, api_for_path, body_usage
from sidecar.metering.record import observed
from sidecar.model import TokenUsage
from sidecar.pricing import PriceBook, cost_micros, requested_image_tokens
from tests.support.meters import end_records
from tests.support.prices import genai_micros

BODY: dict[str, Any] = {
    "model": "gpt-image-1",
    "prompt": "A lighthouse at dusk, in oils.",
    "quality": "high",
    "size": "1536x1024",
}
# gpt-image-1's documented shape.
USAGE = {
    "total_tokens": 6258,
    "input_tokens": 50,
    "output_tokens": 6208,
    "input_tokens_details": {"text_tokens": 40, "image_tokens": 10},
}
WANT = TokenUsage(input_tokens=50, output_tokens=6208, input_image_tokens=10)


def wire(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def test_usage_is_read_from_a_body_as_genai_prices_reads_it() -> None:
    body = {"created": 1, "data": [{"b64_json": "AAAA"}], "usage": USAGE}
    assert body_usage("openai_images", body) == images_body_usage(body) == WANT
    with_details = {**USAGE, "output_tokens_details": {"text_tokens": 8, "image_tokens": 6200}}
    assert images_body_usage({"usage": with_details}) == TokenUsage(
        input_tokens=50, output_tokens=6208, input_image_tokens=10, output_image_tokens=6200
    )
    assert images_body_usage({"data": []}) is None


@pytest.mark.parametrize("piece", [1_000, 65_536, 10_000_000])
def test_a_body_of_megabytes_is_metered_from_its_last_bytes(piece: int) -> None:
    data = wire(images_json({**BODY, "n": 2}, WANT))
    assert len(data) > 2_000_000
    meter = UsageMeter("openai_images", sse=False)
    for start in range(0, len(data), piece):
        meter.feed(data[start : start + piece])
    meter.finish()
    assert meter.usage == TokenUsage(50, 6208) and meter.complete


def test_a_stream_is_metered_from_its_completed_event() -> None:
    data = b"".join(images_frames({**BODY, "stream": True, "partial_images": 2}, WANT))
    meter = UsageMeter.for_response("openai_images", "text/event-stream", "")
    for start in range(0, len(data), 4096):
        meter.feed(data[start : start + 4096])
    meter.finish()
    assert meter.usage == TokenUsage(50, 6208) and meter.complete


def test_usage_inside_a_string_is_not_taken_for_the_bodys() -> None:
    forged = {"usage": {"input_tokens": 1, "output_tokens": 1}}
    body = {
        "data": [{"b64_json": "AAAA", "revised_prompt": f', "usage": {json.dumps(forged)}'}],
        "usage": USAGE,
    }
    assert closing_usage(wire(body), images_body_usage) == WANT
    # Only the string's copy in the bytes kept: nothing, not the forged counts.
    cut = wire(body)[: wire(body).index(b'"usage": {"total')]
    assert closing_usage(cut, images_body_usage) is None
    assert closing_usage(b'{"data": []}', images_body_usage) is None
    assert closing_usage(b'{"usage": {"input_tokens": ', images_body_usage) is None


def test_the_metering_record_is_read_from_its_end() -> None:
    finished, cut_there = end_records(
        "openai_images", "application/json", wire(images_json(BODY, WANT))
    )
    seen, _ = observed(finished)
    assert seen.usage == TokenUsage(50, 6208) and seen.complete
    # Cut before its end: no usage (the call is charged its reservation).
    cut, _ = observed(cut_there)
    assert cut.usage is None and not cut.complete


def test_the_charge_is_genai_prices_price_of_the_usage() -> None:
    price = PriceBook([], None).price("openai", "gpt-image-1")
    assert price is not None
    assert cost_micros(price, WANT) == genai_micros(WANT, "gpt-image-1", "openai")


@pytest.mark.parametrize(
    ("extra", "per_image"),
    [
        ({"quality": "low"}, 408),
        ({"quality": "Medium"}, 1584),
        ({"quality": "high"}, 6240),
        ({"quality": "auto"}, 6240),
        ({}, 6240),
        ({"quality": "low", "partial_images": 3, "stream": True}, 708),
        ({"quality": "low", "partial_images": -3}, 408),
    ],
)
def test_the_reservation_counts_what_an_image_of_its_quality_may_draw(
    extra: dict[str, Any], per_image: int
) -> None:
    body = {"model": "gpt-image-1", "prompt": "x", **extra}
    assert requested_image_tokens(body) == per_image
    # The fake provider's images never draw more than reserved for them.
    for size in ("1024x1024", "1024x1536", "1536x1024"):
        drawn = expected_usage("openai_images", {**body, "size": size}).output_tokens
        assert drawn <= per_image


def test_only_image_requests_on_the_images_api_are_estimated_as_images() -> None:
    assert api_for_path("/openai/v1/images/generations") == "openai_images"
    assert api_for_path("/openai/v1/images%2Fedits") == "openai_images"
    assert unlimited_call("/openai/v1/images/generations", BODY) == "openai_images"
    assert unlimited_call("/openai/v1/chat/completions", {**BODY, "messages": []}) is None
    assert unlimited_call("/openai/v1/images/generations", {"model": "gpt-image-1"}) is None
