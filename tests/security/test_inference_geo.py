"""A caller cannot spend a tenth more than its budgets count by asking Anthropic to run the
model in the US only: `inference_geo: "us"` is billed at 1.1x the global rates, and the
sidecar charges (and reserves) it so, from where the response says the model ran."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import anthropic
import pytest

from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack
from tests.security.conftest import user
from tests.support.ledger import charged
from tests.support.prices import genai_micros

MODEL = "claude-haiku-4-5"
PROMPT: Any = [{"role": "user", "content": "Where does this run? Answer in a few words."}]


def client(stack: Stack, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=stack.envoy_url + "/anthropic",
        api_key="unused",
        max_retries=0,
        default_headers={"authorization": f"Bearer {token}"},
    )


def reference_micros(geo: str | None) -> int:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 24, "messages": PROMPT}
    usage = expected_usage("anthropic_messages", body)
    # Anthropic's US-only surcharge, which genai-prices does not carry.
    factor = Decimal("1.1") if geo == "us" else Decimal(1)
    return genai_micros(usage, MODEL, "anthropic", factor)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("geo", ["us", "global", None])
def test_us_only_inference_is_charged_a_tenth_more_through_envoy(
    stack: Stack, issuer: DevIssuer, geo: str | None, stream: bool
) -> None:
    email = user(f"geo-{geo or 'unset'}-{'stream' if stream else 'json'}")
    extra = {} if geo is None else {"inference_geo": geo}
    sdk = client(stack, issuer.mint(email))
    if stream:
        with sdk.messages.stream(
            model=MODEL, max_tokens=24, messages=PROMPT, extra_body=extra
        ) as events:
            output_tokens = events.get_final_message().usage.output_tokens
    else:
        message = sdk.messages.create(model=MODEL, max_tokens=24, messages=PROMPT, extra_body=extra)
        output_tokens = message.usage.output_tokens
    assert output_tokens > 0
    row = charged(stack, email)
    assert round(row["cost_usd"] * 1_000_000) == reference_micros(geo), row
    if geo == "us":
        assert reference_micros("us") > reference_micros(None)
