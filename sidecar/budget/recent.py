"""A bounded ring of recent 429s and fallbacks, kept in the store for the dashboard.

Why the store and not process memory: behind a load balancer each replica sees only its
share of the refusals, and the dashboard is served by whichever replica the browser
reaches. Every replica writes into the same ring of `SIZE` documents (slot = a shared
sequence number modulo `SIZE`), so any replica shows the latest refusals of all of them.

The write happens off the request path: `observe` is called by the engine after a decision
and only schedules it. A flood of 429s cannot pile up writes: past `MAX_PENDING` writes in
flight, further events are counted in `dropped` and not recorded (the decision log line and
the `sidecar_decisions_total` metric still count every one).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import structlog

from sidecar.model import Decision, RequestAttrs
from sidecar.store.base import DocumentStore

log = structlog.get_logger("sidecar.recent")

COLLECTION = "recent_decisions"
SEQUENCE_KEY = "recent_decisions:seq"
SIZE = 200
# Entries older than this disappear even if nothing overwrites them.
TTL_SECONDS = 7 * 86_400
# The sequence restarting after a year only means slots are reused from the start again.
SEQUENCE_TTL_SECONDS = 365 * 86_400
MAX_PENDING = 64
_BODY_FIELDS = ("rule", "bucket", "spent", "limit", "resets_at")


def entry(attrs: RequestAttrs, decision: Decision, now: float) -> dict[str, Any] | None:
    """What the dashboard shows of one decision; None for decisions it does not list."""
    if decision.http_status != 429 and decision.reason != "fallback":
        return None
    identity = decision.identity
    doc: dict[str, Any] = {
        "at": round(now, 3),
        "status": decision.http_status,
        "reason": decision.reason,
        "request_id": attrs.request_id,
        "user": identity.user if identity else "",
        "kind": identity.kind if identity else "",
        "model": decision.model,
    }
    if decision.reason == "fallback":
        doc["model"] = decision.headers.get("x-sidecar-fallback-from", "")
        doc["fallback_to"] = decision.model
        doc["provider"] = decision.provider
        return doc
    try:
        error = json.loads(decision.body).get("error", {})
    except ValueError:
        error = {}
    if isinstance(error, dict):
        doc.update({k: error[k] for k in _BODY_FIELDS if k in error})
    return doc


class RecentDecisions:
    def __init__(
        self, store: DocumentStore, *, size: int = SIZE, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self.size = size
        self._clock = clock
        self._pending: set[asyncio.Task[None]] = set()
        self.dropped = 0

    def observe(self, attrs: RequestAttrs, decision: Decision) -> None:
        doc = entry(attrs, decision, self._clock())
        if doc is None:
            return
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._write(doc))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, doc: dict[str, Any]) -> None:
        now = float(doc["at"])
        try:
            seq = await self._store.incr(SEQUENCE_KEY, 1, SEQUENCE_TTL_SECONDS, now=now)
            await self._store.put_doc(
                COLLECTION, f"{seq % self.size:05d}", doc, TTL_SECONDS, now=now
            )
        except Exception as exc:  # a display aid: losing one entry must never hurt a request
            log.warning("recent_decision_not_recorded", error=str(exc))

    async def drain(self) -> None:
        """Wait for the writes already scheduled (tests, shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


async def recent(store: DocumentStore, limit: int = 50, *, now: float) -> list[dict[str, Any]]:
    """The latest entries of every replica, newest first."""
    docs = await store.list_docs(COLLECTION, now=now)
    docs.sort(key=lambda d: float(d.get("at", 0)), reverse=True)
    return docs[:limit]
