"""Service tiers billed above the standard price (sidecar/policy/service_tier.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.model import RequestAttrs
from sidecar.policy.service_tier import unpriced_service_tier
from sidecar.store.sqlite_store import SQLiteStore
from tests.unit.test_engine import config, engine

CHAT = {"model": "cent-1", "max_tokens": 1, "messages": []}


@pytest.mark.parametrize(
    "body",
    [
        {"service_tier": "priority"},
        {"service_tier": "PRIORITY"},
        {"service_tier": " flex"},  # not what it looks like: the provider decides
        {"service_tier": "scale"},
        {"service_tier": "fast"},
        {"service_tier": ["flex"]},
        {"service_tier": True},
        {"serviceTier": "priority"},
        {"service_tier": "flex", "serviceTier": "priority"},
        # Anthropic's fast mode; Bedrock's tier object and latency-optimized inference.
        {"speed": "fast"},
        {"speed": "FAST"},
        {"speed": 2},
        {"serviceTier": {"type": "priority"}},
        {"serviceTier": {"type": ["default"]}},
        {"performanceConfig": {"latency": "optimized"}},
        {"performanceConfig": "optimized"},
    ],
)
def test_tiers_billed_above_standard_are_named(body: dict[str, Any]) -> None:
    why = unpriced_service_tier({**CHAT, **body})
    assert why is not None and "billed above the standard price" in why


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"service_tier": None},
        {"service_tier": "auto"},
        {"service_tier": "default"},
        {"service_tier": "Flex"},
        {"service_tier": "standard_only"},
        {"serviceTier": "standard"},
        {"speed": "standard"},
        {"speed": None},
        {"serviceTier": {"type": "flex"}},
        {"serviceTier": {}},
        {"performanceConfig": {"latency": "standard"}},
        {"performanceConfig": {}},
    ],
)
def test_standard_or_cheaper_tiers_pass(body: dict[str, Any]) -> None:
    assert unpriced_service_tier({**CHAT, **body}) is None


def test_a_voice_pace_on_the_speech_api_is_no_level_of_service() -> None:
    speech = {"model": "gpt-4o-mini-tts", "voice": "alloy", "input": "Hi."}
    for pace in (0.25, 1, 4.0):
        assert unpriced_service_tier({**speech, "speed": pace}, "v1/audio/speech") is None
        assert unpriced_service_tier({**speech, "speed": pace}, "v1/Audio%2Fspeech") is None
        # The same number elsewhere is still judged as a level of service.
        assert unpriced_service_tier({**CHAT, "speed": pace}, "v1/messages") is not None
    # A level of service by name is judged on the speech path too.
    for named in ("fast", True, [1]):
        assert unpriced_service_tier({**speech, "speed": named}, "v1/audio/speech") is not None


def test_a_long_value_is_cut_in_the_message() -> None:
    why = unpriced_service_tier({"service_tier": "p" * 10_000})
    assert why is not None and len(why) < 300


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    st = SQLiteStore(f"sqlite:///{tmp_path}/t.db")
    yield st
    await st.close()


def _call(body: dict[str, Any], path: str = "/openai/v1/chat/completions") -> RequestAttrs:
    return RequestAttrs("POST", path, {}, json.dumps(body).encode(), "rid")


async def test_refused_by_default_with_nothing_reserved(store: SQLiteStore) -> None:
    eng = engine(config(), store)
    decision = await eng.check(_call({**CHAT, "service_tier": "priority"}))
    assert (decision.allowed, decision.http_status, decision.reason) == (
        False,
        403,
        "unpriced_service_tier",
    )
    assert json.loads(decision.body)["error"]["type"] == "unpriced_service_tier"
    assert not decision.request_id
    assert await store.open_reservations() == 0
    # The same call at the standard tier (or cheaper) is admitted and reserved.
    assert (await eng.check(_call({**CHAT, "service_tier": "flex"}))).allowed
    assert await store.open_reservations() == 1


async def test_a_call_naming_its_provider_in_the_model_is_judged_too(
    store: SQLiteStore,
) -> None:
    eng = engine(config(), store)
    body = {**CHAT, "model": "openai/cent-1", "service_tier": "priority"}
    decision = await eng.check(_call(body, path="/v1/chat/completions"))
    assert decision.reason == "unpriced_service_tier"


async def test_standard_price_admits_every_tier(store: SQLiteStore) -> None:
    eng = engine(config(admission={"service_tiers": "standard_price"}), store)
    decision = await eng.check(_call({**CHAT, "service_tier": "priority"}))
    assert decision.allowed and decision.request_id
    assert await store.open_reservations() == 1
