"""The demo's policy: the README's example config, pointed at local files and a dev issuer."""

from __future__ import annotations

from typing import Any

from devtools.keys import DevIssuer

# The demo's provider keys: what the sidecar injects and the fake provider expects. Local
# stand-ins for the organisation's real keys, which a deployment mounts as a Secret.
DEMO_PROVIDER_KEYS: dict[str, str] = {
    "openai": "sk-demo-openai-0123456789",
    "anthropic": "sk-ant-demo-0123456789",
    "workers-ai": "cf-demo-workers-ai-0123456789",
    "gemini": "AIza-demo-gemini-0123456789",
    "azure": "demo-azure-openai-0123456789",
    "groq": "gsk-demo-groq-0123456789",
}
KEY_ENV: dict[str, str] = {
    "openai": "DEMO_OPENAI_API_KEY",
    "anthropic": "DEMO_ANTHROPIC_API_KEY",
    "workers-ai": "DEMO_WORKERS_AI_TOKEN",
    "gemini": "DEMO_GEMINI_API_KEY",
    "azure": "DEMO_AZURE_OPENAI_API_KEY",
    "groq": "DEMO_GROQ_API_KEY",
}
# The demo's Azure OpenAI deployments and the models they run.
DEMO_AZURE_DEPLOYMENTS: dict[str, str] = {
    "chat-prod": "gpt-4o-mini",
    "chat-big": "gpt-4o",
    "embed": "text-embedding-3-small",
}


def demo_key_env() -> dict[str, str]:
    """The environment a demo sidecar reads its provider keys from."""
    return {KEY_ENV[provider]: key for provider, key in DEMO_PROVIDER_KEYS.items()}


def _keys(provider: str) -> dict[str, Any]:
    return {"default": {"env": KEY_ENV[provider]}}


def demo_config(
    issuer: DevIssuer, jwks: str, store: str | dict[str, Any], **overrides: Any
) -> dict[str, Any]:
    source = {"jwks_url": jwks} if jwks.startswith("http") else {"jwks_file": jwks}
    config: dict[str, Any] = {
        "account_id": "acme",
        "store": store,
        "admin": {"token_env": "SIDECAR_ADMIN_TOKEN", "groups": ["platform-admins"]},
        "identity": {
            "jwt": {
                "issuers": [
                    {
                        "issuer": issuer.issuer,
                        "audiences": [issuer.audience],
                        "algorithms": ["RS256"],
                        "groups_claim": "groups",
                        "refresh_floor_seconds": 1,
                        **source,
                    }
                ]
            },
            "service_tokens": {"enabled": True},
            "directory": {"groups": {"ml": ["dana@example.com"]}},
        },
        "providers": [
            {"id": "openai", "path_prefix": "/openai/", "credentials": _keys("openai")},
            {"id": "anthropic", "path_prefix": "/anthropic/", "credentials": _keys("anthropic")},
            {
                "id": "workers-ai",
                "path_prefix": "/workers-ai/",
                "pricing_provider": "cloudflare",
                "credentials": _keys("workers-ai"),
            },
            {
                "id": "gemini",
                "path_prefix": "/gemini/",
                "api": "gemini",
                "pricing_provider": "google",
                "credentials": _keys("gemini"),
            },
            {
                "id": "azure",
                "path_prefix": "/azure/",
                "api": "azure_openai",
                "pricing_provider": "azure",
                "deployments": DEMO_AZURE_DEPLOYMENTS,
                "credentials": _keys("azure"),
            },
            # Bedrock signs each request itself: no key is held for it.
            {
                "id": "bedrock",
                "path_prefix": "/bedrock/",
                "api": "bedrock",
                "pricing_provider": "aws",
            },
            {
                "id": "groq",
                "path_prefix": "/groq/",
                "api": "openai_compatible",
                "credentials": _keys("groq"),
            },
        ],
        "models": {
            "default": "allow",
            "rules": [
                {"groups": ["interns"], "allow": ["@cf/*", "gpt-4o-mini"]},
            ],
        },
        "pricing": {"unknown_model": "reject"},
    }
    config.update(overrides)
    return config


DEMO_LIMITS: list[dict[str, Any]] = [
    {
        "name": "per-user-daily",
        "budget_usd": 0.05,
        "window": {"fixed": "daily"},
        "split": ["user"],
        "action": "block",
        "alerts": [50, 90, 100],
    },
    {
        "name": "opus-daily",
        "budget_usd": 0.02,
        "window": {"rolling": "24h"},
        "filter": {"model": ["claude-opus-4*"]},
        "action": "fallback",
    },
]
DEMO_FALLBACKS: dict[str, Any] = {
    "claude-opus-4-7": [{"model": "claude-haiku-4-5", "provider": "anthropic"}],
}
