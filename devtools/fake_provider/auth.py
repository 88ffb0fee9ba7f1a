"""Which provider a call is for, and whether it presents a key that provider accepts."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from devtools.fake_provider.errors import error_body
from sidecar.metering.parse import Api

PREFIXES = ("", "/openai", "/anthropic", "/workers-ai", "/gemini", "/azure", "/bedrock", "/groq")
# Provider names for --key: the prefix without its slash ("openai"), "" for no prefix.
KEY_PROVIDERS = tuple(prefix.lstrip("/") for prefix in PREFIXES)

_HOSTS = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "api.cloudflare.com": "workers-ai",
    "generativelanguage.googleapis.com": "gemini",
    "api.groq.com": "groq",
}
_HOST_SUFFIXES = {".openai.azure.com": "azure", ".amazonaws.com": "bedrock"}


def presented_key(provider: str, headers: Mapping[str, str]) -> str:
    """The key a call to `provider` presents, where that provider reads it."""
    if provider == "anthropic":
        return headers.get("x-api-key", "")
    if provider == "gemini":
        return headers.get("x-goog-api-key", "")
    if provider == "azure":
        return headers.get("api-key", "")
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def key_error(
    provider: str, api: Api, headers: Mapping[str, str], keys: Mapping[str, Collection[str]]
) -> dict[str, Any] | None:
    """The provider's 401 body when it has keys and the call presents none of them."""
    expected = keys.get(provider)
    if not expected or presented_key(provider, headers) in expected:
        return None
    if provider == "anthropic":
        return error_body("anthropic_messages", 401, "invalid x-api-key")
    if provider == "gemini":
        return error_body("gemini", 401, "API key not valid. Please pass a valid API key.")
    error = error_body(api, 401, "Incorrect API key provided.")
    error["error"]["code"] = "invalid_api_key"
    return error


def provider_of(path: str, host: str) -> str:
    """Which provider a call is for: its path prefix, else the Host a proxy addressed it to
    (Envoy strips the prefix and rewrites Host to the provider's), else "" (none)."""
    first = path.split("/", 2)[1] if path.startswith("/") else ""
    if path.startswith("/openai/deployments/"):
        first = "azure"  # Azure OpenAI's own path, not the OpenAI prefix
    if first in KEY_PROVIDERS and first:
        return first
    name = host.split(":", 1)[0].lower()
    for suffix, provider in _HOST_SUFFIXES.items():
        if name.endswith(suffix):
            return provider
    return _HOSTS.get(name, "")
