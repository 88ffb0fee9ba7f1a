"""The request side of each provider API: where the model is and what bounds the output."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from sidecar.config.models import ProviderConfig
from sidecar.envoy.request_path import NoDeployment, PathChange, fallback_path
from sidecar.model import RequestAttrs
from sidecar.policy.request import BadRequest, request_model
from sidecar.pricing import (
    PriceBook,
    PriceOverride,
    estimate_input_tokens,
    requested_output_tokens,
)

DEPLOYMENTS = {"prod-chat": "gpt-4o", "emb": "text-embedding-3-small"}


def attrs(path: str, body: dict[str, Any] | None = None) -> RequestAttrs:
    raw = json.dumps(body).encode() if body is not None else None
    return RequestAttrs("POST", path, {}, raw)


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/bedrock/model/amazon.nova-pro-v1:0/converse", "amazon.nova-pro-v1:0"),
        ("/bedrock/model/amazon.nova-pro-v1%3A0/converse-stream", "amazon.nova-pro-v1:0"),
        (
            "/bedrock/model/us.anthropic.claude-haiku-4-5-20251001-v1%3A0/invoke",
            "us.anthropic.claude-haiku-4-5-20251001-v1:0",
        ),
        (
            "/bedrock/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1234%3Ainference-profile%2Fus.x/"
            "invoke-with-response-stream",
            "arn:aws:bedrock:us-east-1:1234:inference-profile/us.x",
        ),
        (
            "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            "gemini-2.5-flash",
        ),
    ],
)
def test_model_from_the_path(path: str, model: str) -> None:
    prefix = "/" + path.split("/")[1] + "/"
    found = request_model(attrs(path, {"messages": []}), prefix)
    assert found is not None and found[0] == model


def test_bedrock_path_with_encoded_dot_segments_is_refused() -> None:
    with pytest.raises(BadRequest, match="dot segments"):
        request_model(attrs("/bedrock/model/x%2F..%2Fy/converse", {}), "/bedrock/")


def test_azure_deployment_names_its_configured_model() -> None:
    path = "/azure/openai/deployments/prod-chat/chat/completions?api-version=2024-10-21"
    found = request_model(
        attrs(path, {"model": "prod-chat", "messages": []}), "/azure/", DEPLOYMENTS
    )
    assert found is not None and found[0] == "gpt-4o"
    found = request_model(attrs(path, {"messages": []}), "/azure/", DEPLOYMENTS)
    assert found is not None and found[0] == "gpt-4o"


def test_azure_unknown_deployment_is_refused() -> None:
    path = "/azure/openai/deployments/gpt-4o-mini/chat/completions"
    with pytest.raises(BadRequest, match="not configured"):
        request_model(attrs(path, {"model": "gpt-4o-mini"}), "/azure/", DEPLOYMENTS)


def test_azure_body_naming_another_model_is_refused() -> None:
    path = "/azure/openai/deployments/prod-chat/chat/completions"
    with pytest.raises(BadRequest, match="deployment 'prod-chat'"):
        request_model(attrs(path, {"model": "gpt-4o-mini"}), "/azure/", DEPLOYMENTS)


def test_deployments_are_only_read_for_azure_providers() -> None:
    path = "/openai/openai/deployments/prod-chat/chat/completions"
    found = request_model(attrs(path, {"model": "gpt-4o-mini"}), "/openai/")
    assert found is not None and found[0] == "gpt-4o-mini"


@pytest.mark.parametrize(
    ("body", "limit"),
    [
        ({"generationConfig": {"maxOutputTokens": 300}}, 300),
        ({"generation_config": {"max_output_tokens": 301}}, 301),
        ({"inferenceConfig": {"maxTokens": 302}}, 302),
        ({"max_tokens": 5, "inferenceConfig": {"maxTokens": 303}}, 303),
        ({"generationConfig": {"maxOutputTokens": True}}, 1024),
        ({"generationConfig": "x"}, 1024),
    ],
)
def test_nested_output_limits_bound_the_estimate(body: dict[str, Any], limit: int) -> None:
    assert requested_output_tokens(body, 1024) == limit


def test_gemini_prompt_fields_are_estimated() -> None:
    text = "x" * 400
    gemini = {
        "contents": [{"role": "user", "parts": [{"text": text}]}],
        "systemInstruction": {"parts": [{"text": text}]},
    }
    assert estimate_input_tokens(gemini) >= 200
    assert estimate_input_tokens(gemini) > estimate_input_tokens({})


@pytest.mark.parametrize(
    ("path", "model", "deployments", "want"),
    [
        (
            "/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
            "gemini-2.5-flash",
            None,
            PathChange("/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"),
        ),
        (
            "/bedrock/model/amazon.nova-pro-v1%3A0/converse-stream",
            "amazon.nova-lite-v1:0",
            None,
            PathChange("/bedrock/model/amazon.nova-lite-v1%3A0/converse-stream"),
        ),
        (
            "/bedrock/model/arn%3Aaws%3Ax%2Fy/invoke",
            "us.anthropic.claude-haiku-4-5",
            None,
            PathChange("/bedrock/model/us.anthropic.claude-haiku-4-5/invoke"),
        ),
        (
            "/azure/openai/deployments/chat-big/chat/completions?api-version=1",
            "gpt-4o-mini",
            {"chat-big": "gpt-4o", "chat-prod": "GPT-4o-mini"},
            PathChange(
                "/azure/openai/deployments/chat-prod/chat/completions?api-version=1", "chat-prod"
            ),
        ),
        ("/openai/v1/chat/completions", "gpt-4o-mini", None, None),
    ],
)
def test_fallback_rewrites_the_model_in_the_path(
    path: str, model: str, deployments: dict[str, str] | None, want: PathChange | None
) -> None:
    assert fallback_path(path, model, deployments) == want


def test_fallback_to_a_model_no_azure_deployment_runs_is_refused() -> None:
    with pytest.raises(NoDeployment):
        fallback_path(
            "/azure/openai/deployments/chat-big/embeddings", "gpt-4o-mini", {"chat-big": "gpt-4o"}
        )


def test_a_self_hosted_model_is_priced_by_an_override_or_refused() -> None:
    override = PriceOverride(
        provider="self-hosted",
        model="my-llama-*",
        input_per_mtok=Decimal("0.1"),
        output_per_mtok=Decimal("0.2"),
    )
    prices = PriceBook([override], None)
    price = prices.price("self-hosted", "my-llama-8b")
    assert price is not None and (price.input, price.output) == (100_000, 200_000)
    assert prices.price("self-hosted", "another-homegrown-model") is None


@pytest.mark.parametrize(
    ("api", "pricing", "ok"),
    [
        ("openai_compatible", "self-hosted", True),
        ("openai_compatible", "groq", True),
        ("gemini", "google", True),
        ("gemini", "openai", False),
        ("bedrock", "aws", True),
        ("bedrock", "anthropic", False),
        ("azure_openai", "azure", True),
        ("azure_openai", "openai", True),
        ("azure_openai", "google", False),
        ("anthropic", "aws", False),
    ],
)
def test_check_config_refuses_pricing_that_does_not_fit_the_api(
    api: str, pricing: str, ok: bool
) -> None:
    raw = {"id": "p", "path_prefix": "/p/", "api": api, "pricing_provider": pricing}
    if ok:
        ProviderConfig.model_validate(raw)
    else:
        with pytest.raises(ValidationError, match="does not price api"):
            ProviderConfig.model_validate(raw)


def test_azure_v1_api_body_model_names_a_deployment() -> None:
    path = "/azure/openai/v1/chat/completions"
    found = request_model(
        attrs(path, {"model": "prod-chat", "messages": []}), "/azure/", DEPLOYMENTS
    )
    assert found is not None and found[0] == "gpt-4o"
    # A deployment's name proves nothing about its model: an unlisted one is refused, even
    # when it reads like a cheap model.
    with pytest.raises(BadRequest, match="not configured"):
        request_model(attrs(path, {"model": "gpt-4o-mini"}), "/azure/", DEPLOYMENTS)
    hinted = RequestAttrs("POST", path, {}, None, model_hint="prod-chat")
    assert request_model(hinted, "/azure/", DEPLOYMENTS) == ("gpt-4o", {})


def test_azure_v1_fallback_names_the_fallback_deployment_in_the_body() -> None:
    change = fallback_path(
        "/azure/openai/v1/chat/completions", "gpt-4o", {"small": "gpt-4o-mini", "big": "gpt-4o"}
    )
    assert change == PathChange("/azure/openai/v1/chat/completions", "big")


@pytest.mark.parametrize(
    ("raw", "pricing"),
    [
        ({"id": "claude", "api": "anthropic"}, "anthropic"),
        ({"id": "g", "api": "gemini"}, "google"),
        ({"id": "aws-east", "api": "bedrock"}, "aws"),
        ({"id": "groq", "api": "openai_compatible"}, "groq"),
        ({"id": "workers-ai", "pricing_provider": "cloudflare"}, "cloudflare"),
    ],
)
def test_pricing_defaults_to_the_apis_own_provider(raw: dict[str, Any], pricing: str) -> None:
    assert ProviderConfig.model_validate({**raw, "path_prefix": "/p/"}).pricing_id == pricing
