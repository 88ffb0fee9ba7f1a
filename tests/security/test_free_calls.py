"""Counting a prompt's tokens is free at every provider, and costs nothing here either.

Read as generations, `messages/count_tokens` (Anthropic), `responses/input_tokens` (OpenAI)
and `:countTokens` (Gemini) were admitted with a reservation and, answering without usage,
charged it: each count drew a whole call's estimate from the caller's budgets."""

from __future__ import annotations

from typing import Any

import anthropic

from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack
from tests.security.conftest import micros, openai_client, user
from tests.support.ledger import charged
from tests.support.prices import genai_micros

CLAUDE = "claude-haiku-4-5"
PROMPT: Any = [{"role": "user", "content": "How many tokens is this question?"}]


def test_counting_tokens_is_not_charged_through_envoy(stack: Stack, issuer: DevIssuer) -> None:
    email = user("count-tokens")
    token = issuer.mint(email)
    claude = anthropic.Anthropic(
        base_url=stack.envoy_url + "/anthropic",
        api_key="unused",
        max_retries=0,
        default_headers={"authorization": f"Bearer {token}"},
    )
    gpt = openai_client(stack, token)
    stack.clear_seen()
    for _ in range(3):
        assert claude.messages.count_tokens(model=CLAUDE, messages=PROMPT).input_tokens > 0
        assert gpt.responses.input_tokens.count(model="gpt-4o-mini", input="Hi").input_tokens > 0
    # Each reached the provider.
    assert len(stack.seen()) == 6
    # Then one paid call: the ledger holds it alone, at its price (the counts' records went
    # to the sidecar before its own).
    claude.messages.create(model=CLAUDE, max_tokens=16, messages=PROMPT)
    row = charged(stack, email)
    usage = expected_usage(
        "anthropic_messages", {"model": CLAUDE, "max_tokens": 16, "messages": PROMPT}
    )
    assert row["requests"] == 1, row
    assert micros(row["cost_usd"]) == genai_micros(usage, CLAUDE, "anthropic")
