"""A tier of service billed above the standard price is refused before the provider sees it:
prices carry the standard rates only, so a caller asking OpenAI for priority processing
would spend up to twice what every budget counts."""

from __future__ import annotations

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
