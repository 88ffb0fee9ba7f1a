"""Server-side tools whose fees cannot be charged (sidecar/policy/unpriced_tools.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.model import RequestAttrs
from sidecar.policy.unpriced_tools import unpriced_tool
from sidecar.store.sqlite_store import SQLiteStore
from tests.unit.test_engine import config, engine

CHAT = {"model": "cent-1", "max_tokens": 1, "messages": []}


@pytest.mark.parametrize(
    ("body", "what"),
    [
        ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "code interp"),
        ({"tools": [{"type": "function", "name": "f"}, {"type": "image_generation"}]}, "image"),
        ({"tools": [{"type": "IMAGE_GENERATION"}]}, "image generation"),
        ({"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]}, "code exec"),
        ({"tools": [{"type": "code_execution_20990101"}]}, "code execution"),
        ({"tools": [{"googleSearch": {}}]}, "Google Search"),
        ({"tools": [{"google_search_retrieval": {}}]}, "Google Search"),
        ({"tools": [{"functionDeclarations": []}, {"googleMaps": {}}]}, "Google Maps"),
        ({"web_search_options": {}}, "web search options"),
    ],
)
def test_tools_billed_apart_from_tokens_are_named(body: dict[str, Any], what: str) -> None:
    why = unpriced_tool({**CHAT, **body})
    assert why is not None and what in why and "cannot charge it" in why


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"tools": []},
        {"tools": None},
        {"tools": "code_interpreter"},
        {"tools": [{"type": "function", "function": {"name": "code_interpreter"}}]},
        {"tools": [{"type": "web_search"}, {"type": "file_search", "vector_store_ids": []}]},
        {"tools": [{"type": "web_search_20250305"}, {"type": "web_fetch_20250910"}]},
        {"tools": [{"codeExecution": {}}, {"urlContext": {}}]},
        {"tools": [{"name": "google_search", "input_schema": {}}]},  # a function so named
        {"web_search_options": None},
    ],
)
def test_tools_charged_or_costing_tokens_only_pass(body: dict[str, Any]) -> None:
    assert unpriced_tool({**CHAT, **body}) is None


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    st = SQLiteStore(f"sqlite:///{tmp_path}/t.db")
    yield st
    await st.close()


def _call(body: dict[str, Any]) -> RequestAttrs:
    return RequestAttrs("POST", "/openai/v1/responses", {}, json.dumps(body).encode(), "rid")


async def test_refused_by_default_with_nothing_reserved(store: SQLiteStore) -> None:
    eng = engine(config(), store)
    tools = [{"type": "image_generation"}]
    decision = await eng.check(_call({**CHAT, "tools": tools}))
    assert (decision.allowed, decision.http_status, decision.reason) == (
        False,
        403,
        "unpriced_tool",
    )
    assert json.loads(decision.body)["error"]["type"] == "unpriced_tool"
    assert not decision.request_id
    assert await store.open_reservations() == 0
    # The same call with a charged tool is admitted and reserved.
    assert (await eng.check(_call({**CHAT, "tools": [{"type": "web_search"}]}))).allowed
    assert await store.open_reservations() == 1


async def test_allow_admits_them(store: SQLiteStore) -> None:
    eng = engine(config(admission={"unpriced_tools": "allow"}), store)
    decision = await eng.check(_call({**CHAT, "tools": [{"type": "code_interpreter"}]}))
    assert decision.allowed and decision.request_id
    assert await store.open_reservations() == 1
