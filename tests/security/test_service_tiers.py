"""A level of service billed above the standard price is refused before the provider sees
it: prices carry the standard rates only, so a caller asking OpenAI for priority processing
(or Anthropic for fast mode) would spend several times what every budget counts."""

from __future__ import annotations

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from devtools.keys import DevIssuer
from devtools.stack import Stack
from tests.security.conftest import openai_client, user
from tests.support.ledger import charged, ledger_row

MODEL = "gpt-4o-mini"
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hi."}]


@pytest.mark.parametrize("tier", ["priority", "Priority", "scale"])
def test_a_tier_above_standard_is_refused_through_envoy(
    stack: Stack, issuer: DevIssuer, tier: str
) -> None:
    email = user("priority")
    client = openai_client(stack, issuer.mint(email))
    stack.clear_seen()
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=PROMPT,
            max_tokens=8,
            # As sent, whatever the SDK's own list of tiers says.
            extra_body={"service_tier": tier},
        )
    assert refused.value.status_code == 403
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["type"] == "unpriced_service_tier"
    assert stack.seen() == []
    assert ledger_row(stack, email) is None
    # Responses API too.
    with pytest.raises(openai.PermissionDeniedError):
        client.responses.create(model=MODEL, input="Say hi.", extra_body={"service_tier": tier})
    assert stack.seen() == []


def test_a_standard_or_cheaper_tier_is_served_and_charged_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("flex")
    client = openai_client(stack, issuer.mint(email))
    for tier in ("auto", "default", "flex"):
        answer = client.chat.completions.create(
            model=MODEL,
            messages=PROMPT,
            max_tokens=8,
            # As sent, whatever the SDK's own list of tiers says.
            extra_body={"service_tier": tier},
        )
        assert answer.usage is not None
    row = charged(stack, email, requests=3)
    assert row["requests"] == 3


def test_anthropic_fast_mode_is_refused_and_standard_speed_served_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("fast")
    client = anthropic.Anthropic(
        base_url=stack.envoy_url + "/anthropic",
        api_key="unused",
        max_retries=0,
        default_headers={"authorization": f"Bearer {issuer.mint(email)}"},
    )
    stack.clear_seen()
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        client.messages.create(
            model="claude-haiku-4-5",
            max_tokens=8,
            messages=[{"role": "user", "content": "Say hi."}],
            speed="fast",
        )
    assert refused.value.status_code == 403
    assert "speed 'fast' is billed above the standard price" in refused.value.message
    assert stack.seen() == []
    message = client.messages.create(
        model="claude-haiku-4-5",
        max_tokens=8,
        messages=[{"role": "user", "content": "Say hi."}],
        speed="standard",
    )
    assert message.usage.output_tokens > 0
    assert charged(stack, email)["requests"] == 1
