"""Counting tokens is not billed (sidecar/policy/free_calls.py): admitted, nothing reserved."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.model import RequestAttrs
from sidecar.policy.free_calls import free_call
from sidecar.store.sqlite_store import SQLiteStore
from tests.unit.test_engine import config, engine


@pytest.mark.parametrize(
    "path",
    [
        "v1/messages/count_tokens",
        "v1/messages/count_tokens?beta=true",
        "v1/responses/input_tokens",
        "v1beta/models/gemini-2.5-flash:countTokens",
        "v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:countTokens",
        "model/anthropic.claude-haiku-4-5-v1:0/count-tokens",
    ],
)
def test_token_counts_are_free(path: str) -> None:
    assert free_call(path, "POST")


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("v1/messages", "POST"),
        ("v1/messages/count_tokens/x", "POST"),
        ("v1/messages/count_tokensx", "POST"),
        ("V1/Messages/Count_Tokens", "POST"),
        ("v1/responses", "POST"),
        ("v1beta/models/gemini-2.5-flash:generateContent", "POST"),
        ("v1beta/models/gemini-2.5-flash:generateContent/:countTokens", "POST"),
        ("model/amazon.nova-pro-v1:0/converse", "POST"),
        # Encoded: a provider might decode it into another operation than the one judged.
        ("v1beta/models/x%3AgenerateContent%2F:countTokens", "POST"),
        ("v1/messages%2Fcount_tokens", "POST"),
        ("model/arn%3Aaws%3Abedrock/count-tokens", "POST"),
        ("v1/messages/count_tokens", "PUT"),
        ("v1/messages/count_tokens", "post"),
    ],
)
def test_anything_else_is_judged_as_any_call(path: str, method: str) -> None:
    assert not free_call(path, method)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    st = SQLiteStore(f"sqlite:///{tmp_path}/f.db")
    yield st
    await st.close()


async def test_a_count_is_admitted_with_nothing_reserved(store: SQLiteStore) -> None:
    eng = engine(config(), store)
    body = json.dumps({"model": "cent-1", "input": "How long is this?"}).encode()
    counted = await eng.check(
        RequestAttrs("POST", "/openai/v1/responses/input_tokens", {}, body, "r")
    )
    assert counted.allowed and not counted.request_id and counted.http_status == 200
    assert await store.open_reservations() == 0
    # The same body as a generation is reserved for.
    made = await eng.check(RequestAttrs("POST", "/openai/v1/responses", {}, body, "r2"))
    assert made.allowed and made.request_id
    assert await store.open_reservations() == 1
