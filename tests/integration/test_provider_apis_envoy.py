"""Every provider API through a real Envoy with its official client: decided on the model
the API names (path or body), metered from the provider's own usage report, JSON and stream.

Gemini with `google-genai`, Azure OpenAI with `openai.AzureOpenAI`, embeddings and an
OpenAI-compatible server (Groq) with `openai`, Bedrock Runtime with `boto3`. Expected costs
come from the fake provider's deterministic token counts (computed on the body it received)
and genai-prices' own `calc_price`, never from sidecar code.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import openai
import pytest
from botocore.config import Config as BotoConfig
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from devtools.config import DEMO_PROVIDER_KEYS, demo_config
from devtools.fake_provider import expected_usage
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack
from sidecar.metering.parse import Api
from sidecar.model import TokenUsage
from tests.integration.test_metering_envoy import assert_charged
from tests.support.ledger import charged
from tests.support.prices import genai_micros

LIMITS = [
    {
        "name": "per-user-daily",
        "budget_usd": 5,
        "window": {"fixed": "daily"},
        "split": ["user"],
        "action": "block",
    },
    {
        "name": "pricey-fallback",
        "budget_usd": 0.000001,
        "window": {"rolling": "1h"},
        "filter": {
            "model": [
                "gemini-2.5-pro",
                "amazon.nova-pro-v1:0",
                "gpt-4o",
                "llama-3.3-70b-versatile",
                "*claude-sonnet-4-5*",
            ]
        },
        "action": "fallback",
    },
]
FALLBACKS = {
    "gemini-2.5-pro": [{"model": "gemini-2.5-flash", "provider": "gemini"}],
    "amazon.nova-pro-v1:0": [{"model": "amazon.nova-lite-v1:0", "provider": "bedrock"}],
    "gpt-4o": [{"model": "gpt-4o-mini", "provider": "azure"}],
    "llama-3.3-70b-versatile": [{"model": "llama-3.1-8b-instant", "provider": "groq"}],
    "us.anthropic.claude-sonnet-4-5-20250929-v1:0": [
        {"model": "us.anthropic.claude-haiku-4-5-20251001-v1:0", "provider": "bedrock"}
    ],
}
ADMISSION = {"mode": "reserve", "default_max_output_tokens": 1024, "reservation_ttl": "8s"}
GEMINI = "gemini-2.5-flash"
NOVA = "amazon.nova-lite-v1:0"
HAIKU_BEDROCK = "us.anthropic.claude-haiku-4-5-20251001-v1:0"
AZURE_VERSION = "2024-10-21"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("provider-apis")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    config = demo_config(
        issuer,
        jwks,
        f"sqlite:///{workdir}/s.db",
        spend_limits=LIMITS,
        fallbacks=FALLBACKS,
        admission=ADMISSION,
    )
    with running_stack(workdir, issuer, config) as running:
        yield running


def user(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}@apis.test".lower()


def prompt(email: str) -> str:
    # Unique per test, so the body the fake provider received can be found again.
    return f"Count the letters in the word metering, please ({email})."


def seen_entry(stack: Stack, email: str) -> dict[str, Any]:
    """What the fake provider received for this user's call: path, headers, body."""
    for entry in reversed(stack.seen()):
        if email in json.dumps(entry["body"]):
            return dict(entry)
    raise AssertionError(f"the provider saw no call for {email}")


def received(stack: Stack, email: str) -> dict[str, Any]:
    return dict(seen_entry(stack, email)["body"])


def seen_path(stack: Stack, email: str) -> str:
    return str(seen_entry(stack, email)["path"])


def expect(stack: Stack, email: str, api: Api, model: str, pricing: str) -> tuple[TokenUsage, int]:
    usage = expected_usage(api, received(stack, email))
    return usage, genai_micros(usage, model, pricing)


# --- Gemini ---------------------------------------------------------------------------------


def gemini_client(stack: Stack, token: str) -> genai.Client:
    return genai.Client(
        api_key="client-side-key-is-replaced",
        http_options=genai_types.HttpOptions(
            base_url=stack.envoy_url + "/gemini/",
            api_version="v1beta",
            headers={"authorization": f"Bearer {token}"},
            timeout=60_000,
        ),
    )


def test_gemini_json_with_thinking_is_charged_exactly(stack: Stack, issuer: DevIssuer) -> None:
    email = user("gem-json")
    config = genai_types.GenerateContentConfig(
        max_output_tokens=16, thinking_config=genai_types.ThinkingConfig(thinking_budget=64)
    )
    # Held in a variable: the client closes its connections once collected.
    client = gemini_client(stack, issuer.mint(email))
    response = client.models.generate_content(model=GEMINI, contents=prompt(email), config=config)
    usage, cost = expect(stack, email, "gemini", GEMINI, "google")
    # The sidecar's Gemini key replaced the client's, in Gemini's own header.
    headers = seen_entry(stack, email)["headers"]
    assert headers["x-goog-api-key"] == DEMO_PROVIDER_KEYS["gemini"]
    assert "authorization" not in headers
    assert response.usage_metadata is not None
    assert response.usage_metadata.thoughts_token_count == 24
    assert usage.output_tokens == 16 + 24
    assert_charged(stack, email, usage, cost)


def test_gemini_sse_stream_with_cache_is_charged_exactly(stack: Stack, issuer: DevIssuer) -> None:
    email = user("gem-sse")
    config = genai_types.GenerateContentConfig(
        max_output_tokens=12, cached_content="cachedContents/abc"
    )
    client = gemini_client(stack, issuer.mint(email))
    chunks = list(
        client.models.generate_content_stream(model=GEMINI, contents=prompt(email), config=config)
    )
    usage, cost = expect(stack, email, "gemini", GEMINI, "google")
    assert usage.cache_read_tokens > 0 and len(chunks) == 12
    assert_charged(stack, email, usage, cost)


def test_gemini_allowlist_sees_the_model_in_the_path(stack: Stack, issuer: DevIssuer) -> None:
    email = user("gem-intern")
    client = gemini_client(stack, issuer.mint(email, groups=["interns"]))
    with pytest.raises(genai_errors.ClientError) as caught:
        client.models.generate_content(model=GEMINI, contents=prompt(email))
    assert caught.value.code == 403
    assert not any(email in json.dumps(e["body"]) for e in stack.seen())


def test_gemini_fallback_rewrites_the_model_in_the_path(stack: Stack, issuer: DevIssuer) -> None:
    email = user("gem-fallback")
    client = gemini_client(stack, issuer.mint(email))
    client.models.generate_content(
        model="gemini-2.5-pro",
        contents=prompt(email),
        config=genai_types.GenerateContentConfig(max_output_tokens=8),
    )
    assert seen_path(stack, email) == f"/v1beta/models/{GEMINI}:generateContent"
    # Gemini refuses unknown fields: the body gains no `model`.
    assert "model" not in received(stack, email)
    usage, cost = expect(stack, email, "gemini", GEMINI, "google")
    assert_charged(stack, email, usage, cost)


def test_gemini_stream_cut_short_is_still_charged(stack: Stack, issuer: DevIssuer) -> None:
    email = user("gem-cut")
    body = {
        "contents": [{"role": "user", "parts": [{"text": prompt(email)}]}],
        "generationConfig": {"maxOutputTokens": 400},
    }
    url = stack.envoy_url + f"/gemini/v1beta/models/{GEMINI}:streamGenerateContent?alt=sse"
    headers = {"authorization": f"Bearer {issuer.mint(email)}", "x-fake-delay-ms": "200"}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        next(response.iter_bytes())
    row = charged(stack, email)
    # The first chunk's running usage: the whole prompt and at least one output token.
    assert row["input_tokens"] == expected_usage("gemini", body).total_input
    assert row["output_tokens"] >= 1 and row["cost_usd"] > 0


# --- Azure OpenAI ---------------------------------------------------------------------------


def azure_client(stack: Stack, token: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=stack.envoy_url + "/azure",
        api_key="client-key",
        api_version=AZURE_VERSION,
        max_retries=0,
        timeout=60,
        default_headers={"authorization": f"Bearer {token}"},
    )


def test_azure_chat_json_is_charged_as_the_deployments_model(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("az-json")
    azure_client(stack, issuer.mint(email)).chat.completions.create(
        model="chat-prod", messages=[{"role": "user", "content": prompt(email)}], max_tokens=9
    )
    # The sidecar's Azure key replaced the client's, in Azure's `api-key` header.
    assert seen_entry(stack, email)["headers"]["api-key"] == DEMO_PROVIDER_KEYS["azure"]
    usage, cost = expect(stack, email, "openai_chat", "gpt-4o-mini", "azure")
    assert_charged(stack, email, usage, cost)


def test_azure_chat_stream_is_charged_exactly(stack: Stack, issuer: DevIssuer) -> None:
    email = user("az-stream")
    stream = azure_client(stack, issuer.mint(email)).chat.completions.create(
        model="chat-prod",
        messages=[{"role": "user", "content": prompt(email)}],
        max_tokens=7,
        stream=True,
    )
    chunks = list(stream)
    # The usage event the sidecar asked for is not the client's: it never sees it.
    assert all(chunk.usage is None for chunk in chunks)
    usage, cost = expect(stack, email, "openai_chat", "gpt-4o-mini", "azure")
    assert_charged(stack, email, usage, cost)


def test_azure_unknown_deployment_is_refused(stack: Stack, issuer: DevIssuer) -> None:
    email = user("az-unknown")
    with pytest.raises(openai.BadRequestError, match="not configured"):
        azure_client(stack, issuer.mint(email)).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt(email)}]
        )


def test_azure_fallback_switches_to_a_deployment_of_the_fallback_model(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("az-fallback")
    azure_client(stack, issuer.mint(email)).chat.completions.create(
        model="chat-big", messages=[{"role": "user", "content": prompt(email)}], max_tokens=5
    )
    assert seen_path(stack, email) == "/openai/deployments/chat-prod/chat/completions"
    usage, cost = expect(stack, email, "openai_chat", "gpt-4o-mini", "azure")
    assert_charged(stack, email, usage, cost)


def test_azure_embeddings_are_charged_by_prompt_tokens(stack: Stack, issuer: DevIssuer) -> None:
    email = user("az-embed")
    result = azure_client(stack, issuer.mint(email)).embeddings.create(
        model="embed", input=[prompt(email), "second"]
    )
    usage, cost = expect(stack, email, "openai_embeddings", "text-embedding-3-small", "azure")
    assert result.usage.prompt_tokens == usage.input_tokens and usage.output_tokens == 0
    assert_charged(stack, email, usage, cost)


# --- OpenAI embeddings, OpenAI-compatible ---------------------------------------------------


def test_openai_embeddings_are_charged_by_prompt_tokens(stack: Stack, issuer: DevIssuer) -> None:
    email = user("oa-embed")
    client = openai.OpenAI(
        base_url=stack.envoy_url + "/openai/v1",
        api_key=issuer.mint(email),
        max_retries=0,
        timeout=60,
    )
    client.embeddings.create(model="text-embedding-3-small", input=prompt(email))
    usage, cost = expect(stack, email, "openai_embeddings", "text-embedding-3-small", "openai")
    assert_charged(stack, email, usage, cost)


def groq_client(stack: Stack, token: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.envoy_url + "/groq/v1", api_key=token, max_retries=0, timeout=60
    )


@pytest.mark.parametrize("stream", [False, True])
def test_openai_compatible_chat_is_charged_exactly(
    stack: Stack, issuer: DevIssuer, stream: bool
) -> None:
    email = user(f"groq-{stream}")
    client = groq_client(stack, issuer.mint(email))
    model = "llama-3.1-8b-instant"
    messages: Any = [{"role": "user", "content": prompt(email)}]
    if stream:
        list(
            client.chat.completions.create(
                model=model, messages=messages, max_tokens=6, stream=True
            )
        )
    else:
        client.chat.completions.create(model=model, messages=messages, max_tokens=6)
    usage, cost = expect(stack, email, "openai_chat", model, "groq")
    assert_charged(stack, email, usage, cost)


def test_openai_compatible_fallback_rewrites_the_body_model(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("groq-fallback")
    groq_client(stack, issuer.mint(email)).chat.completions.create(
        model="llama-3.3-70b-versatile",
        messages=[{"role": "user", "content": prompt(email)}],
        max_tokens=4,
    )
    assert received(stack, email)["model"] == "llama-3.1-8b-instant"
    usage, cost = expect(stack, email, "openai_chat", "llama-3.1-8b-instant", "groq")
    assert_charged(stack, email, usage, cost)


# --- Bedrock Runtime ------------------------------------------------------------------------


def bedrock_client(stack: Stack, token: str) -> Any:
    client = boto3.client(
        "bedrock-runtime",
        endpoint_url=stack.envoy_url + "/bedrock",
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="example-secret",
        config=BotoConfig(retries={"max_attempts": 1}, read_timeout=60),
    )

    def identify(request: Any, **_: Any) -> None:
        # SigV4 owns Authorization; the caller's Access JWT travels in Access's own header.
        request.headers["cf-access-jwt-assertion"] = token

    client.meta.events.register("before-send.bedrock-runtime.*", identify)
    return client


def converse_args(email: str, max_tokens: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": [{"text": prompt(email)}]}],
        "system": [{"text": "Answer briefly."}],
        "inferenceConfig": {"maxTokens": max_tokens},
    }


def test_bedrock_converse_json_is_charged_exactly(stack: Stack, issuer: DevIssuer) -> None:
    email = user("br-json")
    response = bedrock_client(stack, issuer.mint(email)).converse(
        modelId=NOVA, **converse_args(email, 10)
    )
    usage, cost = expect(stack, email, "bedrock_converse", NOVA, "aws")
    assert response["usage"]["outputTokens"] == 10
    assert_charged(stack, email, usage, cost)


def test_bedrock_converse_stream_binary_event_stream_is_charged_exactly(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("br-stream")
    response = bedrock_client(stack, issuer.mint(email)).converse_stream(
        modelId=NOVA, **converse_args(email, 11)
    )
    events = list(response["stream"])
    assert events[-1]["metadata"]["usage"]["outputTokens"] == 11
    usage, cost = expect(stack, email, "bedrock_converse", NOVA, "aws")
    assert_charged(stack, email, usage, cost)


def test_bedrock_invoke_anthropic_json_and_stream_are_charged_exactly(
    stack: Stack, issuer: DevIssuer
) -> None:
    for stream in (False, True):
        email = user(f"br-invoke-{stream}")
        client = bedrock_client(stack, issuer.mint(email))
        body = json.dumps(
            {
                "anthropic_version": "bedrock-2023-05-31",
                "max_tokens": 9,
                "messages": [{"role": "user", "content": prompt(email)}],
            }
        )
        if stream:
            response = client.invoke_model_with_response_stream(modelId=HAIKU_BEDROCK, body=body)
            assert len(list(response["body"])) > 3
        else:
            response = client.invoke_model(modelId=HAIKU_BEDROCK, body=body)
            assert json.loads(response["body"].read())["usage"]["output_tokens"] == 9
        usage, cost = expect(stack, email, "bedrock_invoke", HAIKU_BEDROCK, "aws")
        assert_charged(stack, email, usage, cost)


def test_bedrock_fallback_rewrites_the_model_id_in_the_path(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("br-fallback")
    bedrock_client(stack, issuer.mint(email)).converse(
        modelId="amazon.nova-pro-v1:0", **converse_args(email, 4)
    )
    assert seen_path(stack, email) == f"/model/{NOVA}/converse"
    usage, cost = expect(stack, email, "bedrock_converse", NOVA, "aws")
    assert_charged(stack, email, usage, cost)


def test_bedrock_allowlist_sees_the_model_id_in_the_path(stack: Stack, issuer: DevIssuer) -> None:
    email = user("br-intern")
    client = bedrock_client(stack, issuer.mint(email, groups=["interns"]))
    with pytest.raises(client.exceptions.ClientError) as caught:
        client.converse(modelId=NOVA, **converse_args(email, 4))
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert not any(email in json.dumps(e["body"]) for e in stack.seen())


def test_bedrock_invoke_fallback_rewrites_the_model_id_in_the_path(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = user("br-invoke-fallback")
    body = json.dumps(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": prompt(email)}],
        }
    )
    client = bedrock_client(stack, issuer.mint(email))
    client.invoke_model(modelId="us.anthropic.claude-sonnet-4-5-20250929-v1:0", body=body)
    assert seen_path(stack, email) == f"/model/{HAIKU_BEDROCK}/invoke"
    # The body names no model and gains none: Bedrock refuses unknown fields.
    assert "model" not in received(stack, email)
    usage, cost = expect(stack, email, "bedrock_invoke", HAIKU_BEDROCK, "aws")
    assert_charged(stack, email, usage, cost)


# --- a client that hangs up mid-stream is still charged -------------------------------------


@pytest.mark.parametrize(
    ("name", "path", "body"),
    [
        (
            "azure",
            "/azure/openai/deployments/chat-prod/chat/completions?api-version=2024-10-21",
            {
                "model": "chat-prod",
                "stream": True,
                "max_tokens": 400,
                "messages": [{"role": "user", "content": "{prompt}"}],
            },
        ),
        (
            "bedrock",
            f"/bedrock/model/{NOVA}/converse-stream",
            {
                "messages": [{"role": "user", "content": [{"text": "{prompt}"}]}],
                "inferenceConfig": {"maxTokens": 400},
            },
        ),
        (
            "groq",
            "/groq/v1/chat/completions",
            {
                "model": "llama-3.1-8b-instant",
                "stream": True,
                "max_tokens": 400,
                "messages": [{"role": "user", "content": "{prompt}"}],
            },
        ),
    ],
)
def test_stream_cut_short_is_still_charged(
    stack: Stack, issuer: DevIssuer, name: str, path: str, body: dict[str, Any]
) -> None:
    email = user(f"{name}-cut")
    sent = json.loads(json.dumps(body).replace("{prompt}", prompt(email)))
    headers = {"authorization": f"Bearer {issuer.mint(email)}", "x-fake-delay-ms": "200"}
    if name == "bedrock":
        headers = {"cf-access-jwt-assertion": issuer.mint(email), "x-fake-delay-ms": "200"}
    with httpx.stream(
        "POST", stack.envoy_url + path, json=sent, headers=headers, timeout=30
    ) as response:
        assert response.status_code == 200
        next(response.iter_bytes())
    row = charged(stack, email)
    # Never $0: the reservation, or more for the text that had streamed past.
    assert row["cost_usd"] > 0 and row["requests"] == 1
