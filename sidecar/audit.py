"""The admin audit trail: every admin write, with who made it, when, and the state before
and after, kept in the store so every replica writes to and reads the same trail."""

from __future__ import annotations

import uuid
from typing import Any

import structlog

from sidecar.store.base import DocumentStore

log = structlog.get_logger("sidecar.audit")

COLLECTION = "audit"
# Kept a little over a year: long enough to answer "who changed this limit last spring".
RETAIN_SECONDS = 400 * 86_400
MAX_LISTED = 1000


def entry_key(at: float) -> str:
    # Zero-padded microseconds first, so keys sort in time order; the suffix keeps two
    # writes in one microsecond apart.
    return f"{round(at * 1_000_000):020d}-{uuid.uuid4().hex[:8]}"


async def record(
    store: DocumentStore, at: float, who: str, action: str, target: str, before: Any, after: Any
) -> dict[str, Any]:
    """Write one entry; `before`/`after` are JSON values (None: absent)."""
    entry = {
        "id": entry_key(at),
        "at": at,
        "who": who,
        "action": action,
        "target": target,
        "before": before,
        "after": after,
    }
    await store.put_doc(COLLECTION, entry["id"], entry, RETAIN_SECONDS, now=at)
    log.info("admin_write", who=who, action=action, target=target)
    return entry


async def latest(
    store: DocumentStore, limit: int = 100, action: str = "", *, now: float
) -> list[dict[str, Any]]:
    """The newest entries first, at most `limit`, optionally of one action only."""
    docs = await store.list_docs(COLLECTION, now=now)
    if action:
        docs = [d for d in docs if d.get("action") == action]
    docs.sort(key=lambda d: str(d.get("id", "")), reverse=True)
    return docs[: max(0, min(limit, MAX_LISTED))]
