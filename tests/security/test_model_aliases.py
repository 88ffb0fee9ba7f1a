"""A model is one model, whatever it is called: an upper-case or dated snapshot name gets
the same allowlist verdict, rule filters and budget bucket as the model it resolves to."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.keys import DevIssuer
from devtools.stack import Stack
from sidecar.budget.explain import simulate
from sidecar.config.loader import parse_config
from sidecar.config.ruleset import RuleSet, RuleSetHolder, build_ruleset
from sidecar.engine import Engine
from sidecar.model import Identity, RequestAttrs
from sidecar.store.sqlite_store import SQLiteStore
from tests.security.policy_stack import CHAT, chat, policy_stack

SNAPSHOTS = ("GPT-4O", "gpt-4o-2024-08-06", " Gpt-4o-2024-11-20 ")


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    return DevIssuer.generate()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    other = DevIssuer.generate("https://partner.example.com", "partner-aud")
    with policy_stack(tmp_path_factory.mktemp("aliases"), issuer, other) as running:
        yield running


def bearer(issuer: DevIssuer, email: str, groups: list[str] | None = None) -> dict[str, str]:
    return {"authorization": f"Bearer {issuer.mint(email, groups)}"}


def test_denied_model_stays_denied_under_any_name_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    headers = bearer(issuer, "cory@example.com", ["contractors"])
    assert chat(stack, headers, "gpt-4o").status_code == 403
    for name in SNAPSHOTS:
        stack.clear_seen()
        response = chat(stack, headers, name)
        assert response.status_code == 403, (name, response.text)
        assert response.json()["error"]["type"] == "model_not_allowed"
        assert stack.seen() == [], name
    # The same caller still reaches models the rule does not deny.
    assert chat(stack, headers, "gpt-4o-mini").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o","model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
        b'{"model":"gpt-4o-mini","model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}',
        b'{"model":"gpt-4o","mod\\u0065l":"gpt-4o-mini","messages":[]}',
    ],
)
def test_a_body_naming_the_model_twice_is_refused_through_envoy(
    stack: Stack, issuer: DevIssuer, body: bytes
) -> None:
    # Which of two `model`s counts differs between JSON parsers: a denied model must not
    # pass the sidecar under one and reach a provider that reads the other.
    headers = {
        **bearer(issuer, "cory@example.com", ["contractors"]),
        "content-type": "application/json",
    }
    stack.clear_seen()
    response = httpx.post(stack.envoy_url + CHAT, content=body, headers=headers, timeout=20)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "bad_request"
    assert "the member 'model' appears twice" in response.json()["error"]["message"]
    assert stack.seen() == []


def test_rule_filter_catches_every_name_of_the_model_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    headers = bearer(issuer, "fay@example.com")
    for name in ("gpt-4o", *SNAPSHOTS):
        response = chat(stack, headers, name, case="filter")
        assert response.status_code == 429, (name, response.text)
        assert response.json()["error"]["rule"] == "gpt4o-zero"


def test_per_model_bucket_is_the_canonical_model_through_envoy(
    stack: Stack, issuer: DevIssuer
) -> None:
    headers = bearer(issuer, "gus@example.com")
    for name in ("gpt-4o", *SNAPSHOTS):
        response = chat(stack, headers, name, case="split")
        assert response.status_code == 429, (name, response.text)
        assert response.json()["error"]["bucket"] == "model=gpt-4o", name


def test_ledger_records_the_canonical_model(stack: Stack, issuer: DevIssuer) -> None:
    headers = bearer(issuer, "hal@example.com")
    for name in ("GPT-4O-MINI", "gpt-4o-mini-2024-07-18"):
        assert chat(stack, headers, name).status_code == 200, name
    with stack.admin() as admin:
        rows = admin.get("/v1/usage", params={"group_by": "user,model"}).json()["result"]
    models = {r["model"] for r in rows if r["user"] == "hal@example.com"}
    assert models == {"gpt-4o-mini"}


# The engine directly, for fallbacks and /v1/simulate: no transport is involved.

NOW = 1_900_000_000.0
ALICE = Identity(kind="user", subject="a", email="alice@example.com", groups=("ml",))


class FixedAuth:
    async def identify(self, headers: Mapping[str, str]) -> tuple[Identity, tuple[str, ...]]:
        return ALICE, ()


def ruleset(**extra: Any) -> RuleSet:
    base: dict[str, Any] = {
        "providers": [{"id": "openai", "path_prefix": "/openai/"}],
        "pricing": {"unknown_model": "reject"},
    }
    return build_ruleset(parse_config({**base, **extra}))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    st = SQLiteStore(f"sqlite:///{tmp_path}/e.db")
    yield st
    await st.close()


def engine(rs: RuleSet, store: SQLiteStore) -> Engine:
    auth = FixedAuth()
    return Engine(RuleSetHolder(rs), store, lambda _: auth, clock=lambda: NOW)


def attrs(model: str, rid: str) -> RequestAttrs:
    body = json.dumps({"model": model, "max_tokens": 4, "messages": []}).encode()
    return RequestAttrs("POST", "/openai/v1/chat/completions", {}, body, rid)


async def test_fallback_chain_applies_to_every_name_of_the_model(store: SQLiteStore) -> None:
    rs = ruleset(
        spend_limits=[
            {
                "name": "f",
                "budget_usd": 0,
                "window": {"fixed": "daily"},
                "filter": {"model": ["gpt-4o"]},
                "action": "fallback",
            }
        ],
        fallbacks={"gpt-4o": [{"model": "gpt-4o-mini"}]},
    )
    for i, name in enumerate(("gpt-4o", *SNAPSHOTS)):
        decision = await engine(rs, store).check(attrs(name, f"r{i}"))
        assert decision.allowed and decision.model == "gpt-4o-mini", (name, decision.body)
        assert decision.headers["x-sidecar-route"] == "fallback"


async def test_simulate_agrees_with_the_check_on_snapshot_names(store: SQLiteStore) -> None:
    rs = ruleset(models={"rules": [{"groups": ["ml"], "allow": ["*"], "deny": ["gpt-4o"]}]})
    eng = engine(rs, store)
    provider = rs.provider_by_id["openai"]
    for i, name in enumerate(SNAPSHOTS):
        decision = await eng.check(attrs(name, f"s{i}"))
        assert decision.http_status == 403, name
        result = await simulate(eng, ALICE, name.strip(), provider, {}, {"max_tokens": 4})
        assert (result["status"], result["reason"]) == (403, "model_not_allowed"), name
