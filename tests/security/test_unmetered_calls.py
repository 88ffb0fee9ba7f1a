"""Calls whose cost never comes back through the gateway are refused before the provider
sees them: a realtime session minted with the organisation's key, a batch, a background
response. Each would otherwise be charged its reservation, an estimate that bounds nothing."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from devtools.keys import DevIssuer
from devtools.stack import Stack
from tests.security.conftest import openai_client, user
from tests.support.ledger import ledger_row

MODEL = "gpt-4o-mini"


def _post(stack: Stack, token: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        stack.envoy_url + path,
        headers={"authorization": f"Bearer {token}"},
        json=body,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/openai/v1/realtime/sessions", {"model": MODEL}),
        ("/openai/v1/fine_tuning/jobs", {"model": MODEL, "training_file": "file-1"}),
        ("/openai/v1/batches", {"model": MODEL, "input_file_id": "file-1"}),
        (
            "/gemini/v1beta/models/gemini-2.5-flash%3AbatchGenerateContent",
            {"batch": {"input_config": {"requests": {"requests": []}}}},
        ),
        ("/anthropic/v1/messages/batches", {"model": "claude-haiku-4-5", "requests": []}),
        # Storage billed by the day, containers by the container, video by the second, and
        # evaluation runs that call models after their answer. Without a model such a POST
        # is refused anyway (400: a POST to a provider names its model); naming a priced
        # one, as a caller can, it was admitted and charged its estimate.
        ("/openai/v1/vector_stores", {"name": "knowledge", "model": MODEL}),
        ("/openai/v1/vector_stores/vs_1/files", {"file_id": "file-1", "model": MODEL}),
        ("/openai/v1/containers", {"name": "sandbox", "model": MODEL}),
        ("/openai/v1/videos", {"model": MODEL, "prompt": "A lighthouse.", "seconds": "12"}),
        ("/openai/v1/evals/eval_1/runs", {"model": MODEL, "data_source": {"model": MODEL}}),
    ],
)
def test_unmetered_call_is_refused_before_the_provider_through_envoy(
    stack: Stack, issuer: DevIssuer, path: str, body: dict[str, Any]
) -> None:
    email = user("unmetered")
    stack.clear_seen()
    response = _post(stack, issuer.mint(email), path, body)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["type"] == "unmetered_call"
    assert stack.seen() == []
    assert ledger_row(stack, email) is None


def test_background_response_is_refused_and_a_foreground_one_served_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    client = openai_client(stack, issuer.mint(user("background")))
    stack.clear_seen()
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.responses.create(model=MODEL, input="Write at length.", background=True)
    assert refused.value.status_code == 403
    assert "background" in refused.value.message
    assert stack.seen() == []
    served = client.responses.create(model=MODEL, input="Write at length.", max_output_tokens=16)
    assert served.status == "completed" and served.usage is not None


def test_reading_a_batch_is_identity_only_through_envoy(stack: Stack, issuer: DevIssuer) -> None:
    response = httpx.get(
        stack.envoy_url + "/openai/v1/batches/batch_1",
        headers={"authorization": f"Bearer {issuer.mint(user('reader'))}"},
        timeout=30,
    )
    # The sidecar lets it pass; the fake provider has no such route.
    assert response.status_code == 404, response.text
    assert "unmetered_call" not in response.text


CACHE = "/gemini/v1beta/cachedContents"


def test_a_context_cache_billed_by_the_hour_is_refused_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    # Gemini bills an explicit cache's storage for as long as its TTL runs, after the call
    # that makes it: a year of a large cache would cost thousands of dollars that no
    # response ever reports. Making one (with its model) and lengthening one (no model)
    # are refused; reading and deleting one (which ends its bill) pass.
    email = user("cache")
    token = issuer.mint(email)
    stack.clear_seen()
    for model in ("gemini-2.5-flash", "models/gemini-2.5-flash"):
        made = _post(
            stack,
            token,
            CACHE,
            {
                "model": model,
                "contents": [{"role": "user", "parts": [{"text": "A long shared document."}]}],
                "ttl": "31536000s",
            },
        )
        assert made.status_code == 403, made.text
        assert made.json()["error"]["type"] == "unmetered_call"
        assert "storage" in made.json()["error"]["message"]
    headers = {"authorization": f"Bearer {token}"}
    longer = httpx.patch(
        stack.envoy_url + CACHE + "/abc%3Fx", headers=headers, json={"ttl": "31536000s"}
    )
    assert longer.status_code == 403, longer.text
    # Nor as a read asking the provider to take it as that write.
    overridden = httpx.get(
        stack.envoy_url + CACHE + "/abc",
        headers={**headers, "x-http-method-override": "PATCH"},
    )
    assert overridden.status_code == 403, overridden.text
    assert stack.seen() == []
    assert ledger_row(stack, email) is None
    for method in ("GET", "DELETE"):
        passed = httpx.request(method, stack.envoy_url + CACHE + "/abc", headers=headers)
        # The sidecar lets it pass; the fake provider has no such route.
        assert passed.status_code == 404, (method, passed.text)
