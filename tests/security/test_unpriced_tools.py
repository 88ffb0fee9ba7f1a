"""Server-side tools billed apart from tokens, at a price no response reports, are refused
before the provider sees them: the caller would otherwise spend on images and containers
while every budget counts only the tokens."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from devtools.keys import DevIssuer
from devtools.stack import Stack
from tests.security.conftest import openai_client, user
from tests.support.ledger import charged, ledger_row

MODEL = "gpt-4o-mini"


@pytest.mark.parametrize(
    "tools",
    [[{"type": "image_generation"}], [{"type": "code_interpreter", "container": {"type": "auto"}}]],
)
def test_an_unpriced_tool_is_refused_through_envoy(
    stack: Stack, issuer: DevIssuer, tools: list[dict[str, Any]]
) -> None:
    email = user("tools")
    client = openai_client(stack, issuer.mint(email))
    stack.clear_seen()
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.responses.create(model=MODEL, input="Draw a cat.", extra_body={"tools": tools})
    assert refused.value.status_code == 403
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["type"] == "unpriced_tool"
    assert stack.seen() == []
    assert ledger_row(stack, email) is None


def test_gemini_grounding_is_refused_and_a_plain_call_served_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("grounding")
    url = stack.envoy_url + "/gemini/v1beta/models/gemini-2.5-flash:generateContent"
    headers = {"authorization": f"Bearer {issuer.mint(email)}"}
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": "News today?"}]}]}
    stack.clear_seen()
    refused = httpx.post(url, json={**body, "tools": [{"google_search": {}}]}, headers=headers)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["type"] == "unpriced_tool"
    assert stack.seen() == []
    served = httpx.post(url, json=body, headers=headers, timeout=30)
    assert served.status_code == 200, served.text
    assert charged(stack, email)["requests"] == 1
