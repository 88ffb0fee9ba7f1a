"""Calls whose cost never comes back through the gateway (sidecar/policy/unmetered.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.model import RequestAttrs
from sidecar.policy.unmetered import unmetered_call
from sidecar.store.sqlite_store import SQLiteStore
from tests.unit.test_engine import config, engine

CHAT = {"model": "cent-1", "max_tokens": 1, "messages": []}


@pytest.mark.parametrize(
    ("path", "method", "headers", "body", "what"),
    [
        ("v1/realtime/sessions", "POST", {}, CHAT, "realtime sessions"),
        ("v1/realtime/client_secrets", "POST", {}, {}, "realtime sessions"),
        # A WebSocket is opened with a GET: refused whatever the method.
        ("v1/realtime", "GET", {"upgrade": "websocket"}, {}, "realtime sessions"),
        ("v1/Realtime%2Ftranscription_sessions", "POST", {}, CHAT, "realtime sessions"),
        ("v1/fine_tuning/jobs", "POST", {}, CHAT, "fine-tuning jobs"),
        ("v1/batches", "POST", {}, CHAT, "batches"),
        ("openai/batches?api-version=2025-01-01", "POST", {}, CHAT, "batches"),
        ("v1/messages/batches", "POST", {}, CHAT, "batches"),
        ("v1beta/models/gemini-2.5-flash:batchGenerateContent", "POST", {}, CHAT, "batches"),
        ("v1beta/models/gemini-2.5-flash%3AbatchGenerateContent", "POST", {}, CHAT, "batches"),
        ("v1beta/models/e:asyncBatchEmbedContent", "POST", {}, CHAT, "batches"),
        ("async-invoke", "POST", {}, CHAT, "asynchronous invocations"),
        ("v1/responses", "POST", {}, {**CHAT, "background": True}, "background response"),
        # Not a boolean is not "off": the provider decides what it means.
        ("v1/responses", "POST", {}, {**CHAT, "background": "true"}, "background response"),
        ("v1/chat/completions", "POST", {"upgrade": "websocket"}, CHAT, "upgraded"),
        ("v1/responses", "GET", {"upgrade": "h2c, websocket"}, {}, "upgraded"),
        ("v1beta/cachedContents", "POST", {}, CHAT, "context caches"),
        ("v1beta/CachedContents/abc", "PATCH", {}, {"ttl": "86400s"}, "context caches"),
        ("v1beta/cachedContents%2Fabc", "PUT", {}, {}, "context caches"),
        (
            "v1/projects/p/locations/us-central1/cachedContents",
            "POST",
            {},
            CHAT,
            "context caches",
        ),
        # A read that asks to be taken as a write is judged as the write.
        (
            "v1beta/cachedContents/abc",
            "GET",
            {"x-http-method-override": "patch"},
            {"ttl": "86400s"},
            "context caches",
        ),
        ("v1/batches", "GET", {"x-http-method": "POST"}, CHAT, "batches"),
        # Storage billed by the day, containers by the container, indexing by the token.
        ("v1/vector_stores", "POST", {}, {"name": "kb"}, "vector stores"),
        ("v1/vector_stores/vs_1", "POST", {}, {"expires_after": None}, "vector stores"),
        ("v1/vector_stores/vs_1/files", "POST", {}, {"file_id": "f"}, "vector stores"),
        ("v1/Vector_Stores/vs_1/file_batches", "POST", {}, {}, "vector stores"),
        ("v1/containers", "POST", {}, {"name": "c"}, "code interpreter containers"),
        ("v1/containers/cntr_1/files", "POST", {}, {}, "code interpreter containers"),
        ("v1beta/fileSearchStores/s:importFile", "POST", {}, {}, "file search stores"),
        (
            "upload/v1beta/fileSearchStores/s:uploadToFileSearchStore",
            "POST",
            {},
            {},
            "file search stores",
        ),
        # Work that calls models or draws video after its answer.
        ("v1/evals/eval_1/runs", "POST", {}, {"data_source": {}}, "evaluation runs"),
        ("v1/videos", "POST", {}, {"model": "sora-2", "seconds": "12"}, "video generations"),
        ("v1/videos/video_1/remix", "POST", {}, {}, "video generations"),
        ("v1beta/models/veo-3.0:predictLongRunning", "POST", {}, {}, "long-running"),
        (
            "v1/projects/p/locations/us-central1/batchPredictionJobs",
            "POST",
            {},
            {},
            "batches",
        ),
        ("v1/projects/p/locations/us-central1/tuningJobs", "POST", {}, {}, "fine-tuning jobs"),
    ],
)
def test_calls_the_gateway_cannot_meter_are_named(
    path: str, method: str, headers: dict[str, str], body: dict[str, Any], what: str
) -> None:
    reason = unmetered_call(path, method, headers, body)
    assert reason is not None and what in reason


@pytest.mark.parametrize(
    ("path", "method", "headers", "body"),
    [
        ("v1/chat/completions", "POST", {}, CHAT),
        ("v1/responses", "POST", {}, {**CHAT, "background": False}),
        ("v1/responses", "POST", {}, {**CHAT, "background": None}),
        # Reading a job or a batch costs nothing.
        ("v1/fine_tuning/jobs", "GET", {}, {}),
        ("v1/batches/batch_1", "GET", {}, {}),
        # `background` of the image API is a colour, not a mode.
        ("v1/images/generations", "POST", {}, {**CHAT, "background": "transparent"}),
        ("v1/chat/completions", "POST", {"upgrade": "h2c"}, CHAT),
        ("v1/realtimeish/x", "POST", {}, CHAT),
        # Decoded once, as the provider does: not the Responses API.
        ("v1%252Fresponses", "POST", {}, {**CHAT, "background": True}),
        ("v1/files/batches.jsonl/content", "GET", {}, {}),
        # Reading a context cache costs nothing; deleting one ends its storage bill.
        ("v1beta/cachedContents", "GET", {}, {}),
        ("v1beta/cachedContents/abc", "DELETE", {}, {}),
        # A generation that reads a cache is metered (its cached tokens at the read rate).
        ("v1beta/models/gemini-2.5-flash:generateContent", "POST", {}, {"cachedContent": "c/1"}),
        ("v1beta/cachedContentsish", "POST", {}, CHAT),
        # Searching a vector store stores nothing; reading and deleting cost nothing.
        ("v1/vector_stores/vs_1/search", "POST", {}, {"query": "q"}),
        ("v1/vector_stores/vs_1", "DELETE", {}, {}),
        ("v1/containers/cntr_1", "DELETE", {}, {}),
        ("v1/videos/video_1/content", "GET", {}, {}),
        # A deployment or a model named like an API is no such API.
        ("openai/deployments/videos/chat/completions", "POST", {}, CHAT),
        ("openai/deployments/containers/chat/completions", "POST", {}, CHAT),
        ("v1beta/models/videos:generateContent", "POST", {}, CHAT),
    ],
)
def test_metered_calls_pass(
    path: str, method: str, headers: dict[str, str], body: dict[str, Any]
) -> None:
    assert unmetered_call(path, method, headers, body) is None


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    st = SQLiteStore(f"sqlite:///{tmp_path}/u.db")
    yield st
    await st.close()


def _call(path: str, body: dict[str, Any], method: str = "POST") -> RequestAttrs:
    return RequestAttrs(method, path, {}, json.dumps(body).encode(), "rid")


async def test_refused_by_default_and_nothing_is_reserved(store: SQLiteStore) -> None:
    eng = engine(config(), store)
    decision = await eng.check(_call("/openai/v1/responses", {**CHAT, "background": True}))
    assert (decision.allowed, decision.http_status, decision.reason) == (
        False,
        403,
        "unmetered_call",
    )
    assert json.loads(decision.body)["error"]["type"] == "unmetered_call"
    assert not decision.request_id
    assert await store.open_reservations() == 0
    listed = await eng.check(_call("/openai/v1/fine_tuning/jobs", {}, method="GET"))
    assert listed.allowed


async def test_reserve_admits_them_charged_their_reservation(store: SQLiteStore) -> None:
    eng = engine(config(admission={"unmetered_calls": "reserve"}), store)
    decision = await eng.check(_call("/openai/v1/batches", CHAT))
    assert decision.allowed and decision.request_id
    assert await store.open_reservations() == 1


async def test_a_call_naming_its_provider_in_the_model_is_judged_too(
    store: SQLiteStore,
) -> None:
    eng = engine(config(), store)
    # No provider prefix: the provider comes from the model's name.
    decision = await eng.check(_call("/v1/batches", {**CHAT, "model": "openai/cent-1"}))
    assert decision.reason == "unmetered_call"


async def test_other_services_behind_envoy_are_not_judged(store: SQLiteStore) -> None:
    eng = engine(config(), store)
    # Neither a provider's path nor a model: another service, checked for identity only.
    decision = await eng.check(_call("/realtime/dashboard", {}, method="GET"))
    assert decision.allowed and decision.reason == "ok"
