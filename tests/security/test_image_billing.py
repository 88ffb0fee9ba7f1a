"""Images from OpenAI's images API are charged what the provider reports they drew.

A high-quality gpt-image-1 image draws up to 6,240 output tokens at $40 per million; its
answer (megabytes of base64, `usage` last) was not read, and the call was charged its
reservation of 1,024 output tokens: a caller drew four images for the price of one."""

from __future__ import annotations

from typing import Any

import pytest

from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack
from sidecar.model import TokenUsage
from tests.security.conftest import openai_client, user
from tests.support.ledger import charged
from tests.support.prices import genai_micros

MODEL = "gpt-image-1"
PROMPT = "A lighthouse at dusk, in oils."


def reference(body: dict[str, Any]) -> tuple[TokenUsage, int]:
    usage = expected_usage("openai_images", {"model": MODEL, "prompt": PROMPT, **body})
    return usage, genai_micros(usage, MODEL, "openai")


@pytest.mark.parametrize(
    ("quality", "size", "n"), [("high", "1536x1024", 1), ("medium", "1024x1024", 2)]
)
def test_an_image_is_charged_what_it_drew_through_envoy(
    stack: Stack, issuer: DevIssuer, quality: Any, size: Any, n: int
) -> None:
    email = user(f"image-{quality}")
    client = openai_client(stack, issuer.mint(email))
    answer = client.images.generate(model=MODEL, prompt=PROMPT, quality=quality, size=size, n=n)
    assert answer.data is not None and len(answer.data) == n
    usage, want = reference({"quality": quality, "size": size, "n": n})
    assert answer.usage is not None and answer.usage.output_tokens == usage.output_tokens
    row = charged(stack, email)
    assert round(row["cost_usd"] * 1_000_000) == want, row
    assert row["output_tokens"] == usage.output_tokens


def test_a_streamed_image_is_charged_what_it_drew_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("image-stream")
    client = openai_client(stack, issuer.mint(email))
    events = client.images.generate(
        model=MODEL, prompt=PROMPT, quality="high", size="1024x1536", stream=True, partial_images=2
    )
    kinds = [event.type for event in events]
    assert kinds == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    usage, want = reference(
        {"quality": "high", "size": "1024x1536", "stream": True, "partial_images": 2}
    )
    row = charged(stack, email)
    assert round(row["cost_usd"] * 1_000_000) == want, row
    assert row["output_tokens"] == usage.output_tokens == 6440
