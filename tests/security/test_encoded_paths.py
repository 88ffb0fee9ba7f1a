"""A percent-escape in the path does not hide which API answers.

Envoy's `normalize_path` decodes unreserved characters but keeps `%2F` and `%3A` as sent,
and a provider that decodes them serves `/v1/chat%2Fcompletions` as chat completions. Read
raw, such a path named no metered API: the call was charged its reservation (here two
output tokens, `default_max_output_tokens`) while the model wrote twenty. Each call below
goes once by its plain path and once by an encoded spelling, as two users, and must leave
the same ledger row: the provider's usage, not the estimate.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack
from sidecar.metering.parse import Api
from tests.security.conftest import user
from tests.support.ledger import charged

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Write at length."}]}
GEMINI = {"contents": [{"role": "user", "parts": [{"text": "Write at length."}]}]}
GEMINI_PATH = "/gemini/v1beta/models/gemini-2.5-flash"
# The reservation of a call that names no output limit: default_max_output_tokens.
RESERVED_OUTPUT_TOKENS = 2


def _call(stack: Stack, issuer: DevIssuer, email: str, path: str, body: dict[str, Any]) -> str:
    response = httpx.post(
        stack.envoy_url + path,
        headers={"authorization": f"Bearer {issuer.mint(email)}"},
        json=body,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.text


def _same_charge(
    stack: Stack,
    issuer: DevIssuer,
    api: Api,
    plain: str,
    encoded: str,
    body: dict[str, Any],
) -> str:
    """Calls `plain` and `encoded` as two users; the encoded call's answer."""
    assert httpx.URL(stack.envoy_url + encoded).raw_path.decode().endswith(encoded.split("?")[0])
    first, second = user("plain-path"), user("encoded-path")
    _call(stack, issuer, first, plain, body)
    answer = _call(stack, issuer, second, encoded, body)
    expected = expected_usage(api, body)
    assert expected.output_tokens > RESERVED_OUTPUT_TOKENS
    want, got = charged(stack, first), charged(stack, second)
    assert (got["input_tokens"], got["output_tokens"]) == (
        expected.total_input,
        expected.output_tokens,
    )
    assert got["cost_usd"] == want["cost_usd"] > 0
    return answer


@pytest.mark.parametrize("slash", ["%2F", "%2f"])
def test_chat_path_with_an_encoded_slash_is_charged_its_usage_through_envoy(
    stack: Stack, issuer: DevIssuer, slash: str
) -> None:
    _same_charge(
        stack,
        issuer,
        "openai_chat",
        "/openai/v1/chat/completions",
        f"/openai/v1/chat{slash}completions",
        CHAT,
    )


def test_stream_on_an_encoded_path_gets_its_usage_asked_for_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    # The client asks for no usage: the Check must still have it inserted, and the client
    # must still not see it.
    answer = _same_charge(
        stack,
        issuer,
        "openai_chat",
        "/openai/v1/chat/completions",
        "/openai/v1/chat%2Fcompletions",
        {**CHAT, "stream": True},
    )
    events = [line[6:] for line in answer.splitlines() if line.startswith("data: {")]
    assert events and all(json.loads(e).get("usage") is None for e in events)


def test_gemini_path_with_an_encoded_colon_is_charged_its_usage_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    _same_charge(
        stack,
        issuer,
        "gemini",
        f"{GEMINI_PATH}:generateContent",
        f"{GEMINI_PATH}%3AgenerateContent",
        GEMINI,
    )
