"""The reservation covers every answer a request asks for, and an output limit too large to
be real is refused before its estimate reaches the store (where, written behind, it failed
the whole batch of reservations it was written with)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from sidecar.config.ruleset import RuleSet, RuleSetHolder
from sidecar.engine import Engine
from sidecar.model import Decision, RequestAttrs
from sidecar.store.base import Store
from sidecar.store.factory import open_store
from tests.unit.test_engine import ALICE, NOW, FixedAuth, config, rule

# cent-* costs $0.01 an output token and nothing an input token.
BLOCK = rule("cap", 0.10, "block", ["cent-*"])


def engine(rs: RuleSet, store: Store) -> Engine:
    auth = FixedAuth(ALICE)
    return Engine(RuleSetHolder(rs), store, lambda _: auth, clock=lambda: NOW)


def _body(**extra: Any) -> RequestAttrs:
    body = json.dumps({"model": "cent-1", "messages": [], **extra}).encode()
    return RequestAttrs("POST", "/openai/v1/chat/completions", {}, body, "")


def _error(decision: Decision) -> dict[str, Any]:
    return dict(json.loads(decision.body)["error"])


async def test_each_answer_asked_for_is_reserved(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/a.db", owner=True)
    try:
        eng = engine(config(spend_limits=[BLOCK]), store)
        # 3 tokens, one answer: $0.03 of $0.10.
        assert (await eng.check(_body(max_tokens=3))).allowed
        # 3 tokens, four answers: $0.12, more than the whole limit.
        refused = await eng.check(_body(max_tokens=3, n=4))
        assert refused.http_status == 429
        assert _error(refused)["code"] == "request_exceeds_limit"
        gemini_style = await eng.check(_body(max_tokens=3, generationConfig={"candidateCount": 4}))
        assert gemini_style.http_status == 429
    finally:
        await store.close()


async def test_limits_too_large_are_refused_and_the_batch_around_them_is_written(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/b.db"
    store = await open_store(url, owner=True)
    monitor = {**rule("watch", 1.0, "monitor", ["cent-*"])}
    eng = engine(config(spend_limits=[monitor]), store)
    with capture_logs() as logs:
        first = await eng.check(_body(max_tokens=5))
        huge = await eng.check(_body(max_tokens=10**30))
        many = await eng.check(_body(max_tokens=5, n=129))
        last = await eng.check(_body(max_tokens=7))
        await store.close()
    assert first.allowed and last.allowed
    for refused in (huge, many):
        assert (refused.http_status, refused.reason) == (400, "bad_request")
        assert not refused.request_id
    assert "at most 10000000 tokens" in _error(huge)["message"]
    assert "at most 128 answers" in _error(many)["message"]
    assert not [e for e in logs if e["event"] == "reservations_write_failed"]
    reopened = await open_store(url, owner=True)
    try:
        assert await reopened.open_reservations() == 2
    finally:
        await reopened.close()
