"""The stack the policy attacks are sent through: a real Envoy, the sidecar and the fake
provider, with two trusted JWT issuers and rules shaped to show each hole."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack

CHAT = "/openai/v1/chat/completions"
LLAMA = "@cf/meta/llama-3.1-8b-instruct"
# Each zero-dollar rule applies only to requests that name its case in cf-aig-metadata, so
# one stack can show a filter, a split by model and a split by user.
LIMITS: list[dict[str, Any]] = [
    {
        "name": "gpt4o-zero",
        "budget_usd": 0,
        "window": {"fixed": "daily"},
        "filter": {"model": ["gpt-4o"], "metadata.case": ["filter"]},
        "action": "block",
    },
    {
        "name": "per-model-zero",
        "budget_usd": 0,
        "window": {"fixed": "daily"},
        "filter": {"metadata.case": ["split"]},
        "split": ["model"],
        "action": "block",
    },
    {
        "name": "per-user-zero",
        "budget_usd": 0,
        "window": {"fixed": "daily"},
        "filter": {"metadata.case": ["user"]},
        "split": ["user"],
        "action": "block",
    },
]
MODEL_RULES: list[dict[str, Any]] = [
    {"groups": ["contractors"], "allow": ["*"], "deny": ["gpt-4o", "@cf/meta/*"]},
]


def policy_config(issuer: DevIssuer, other: DevIssuer, workdir: Path) -> dict[str, Any]:
    config = demo_config(
        issuer,
        str(issuer.write_jwks(workdir / "jwks.json")),
        f"sqlite:///{workdir}/sidecar.db",
        spend_limits=LIMITS,
    )
    config["models"]["rules"] = [*MODEL_RULES, *config["models"]["rules"]]
    identity = config["identity"]
    other_jwks = other.write_jwks(workdir / "other-jwks.json")
    identity["jwt"]["issuers"].append(
        {
            "issuer": other.issuer,
            "audiences": [other.audience],
            "algorithms": ["RS256"],
            "jwks_file": str(other_jwks),
        }
    )
    # Granted to dana as the first issuer signs her in, and to nobody the second one names.
    identity["directory"] = {
        "groups": {"ml": [{"email": "dana@example.com", "issuer": issuer.issuer}]}
    }
    return config


@contextmanager
def policy_stack(workdir: Path, issuer: DevIssuer, other: DevIssuer) -> Iterator[Stack]:
    with running_stack(workdir, issuer, policy_config(issuer, other, workdir)) as stack:
        yield stack


def chat(
    stack: Stack, headers: dict[str, str], model: str = "gpt-4o-mini", case: str | None = None
) -> httpx.Response:
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    if case is not None:
        headers = {**headers, "cf-aig-metadata": json.dumps({"case": case})}
    return httpx.post(stack.envoy_url + CHAT, json=body, headers=headers, timeout=20)


def upstream_headers(stack: Stack) -> dict[str, str]:
    seen = stack.seen()
    assert seen, "the upstream saw no request"
    return {k.lower(): v for k, v in seen[-1]["headers"].items()}
