"""CLI sessions: what a device login's refresh token stands for, and what logout revokes.

A session is one store document, keyed by its id, which every access token minted for it
carries (`sid`). The refresh token is the id plus a random secret; only a SHA-256 of the
secret is stored, and each use replaces it (compare-and-set), so a refresh token works
once. A refresh token presented again after it was replaced was copied: the whole session
is revoked, and with it every access token it issued.
"""

from __future__ import annotations

import hmac
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.identity.secret_hash import secret_hash
from sidecar.store.base import Doc, DocumentStore

COLLECTION = "cli_sessions"
# How long a session's state may be served from memory: bounds how late a revocation made
# through another replica takes effect for access tokens.
CACHE_SECONDS = 0.5
# Revoked sessions are kept this long so their tokens keep getting a clear answer.
RETAIN_REVOKED_SECONDS = 86_400
MAX_REFRESH_BYTES = 256

Scope = Literal["", "admin"]
RefreshError = Literal["invalid_grant", "reused"]


@dataclass(frozen=True)
class Refreshed:
    session: Doc
    refresh_token: str


def public_view(doc: Doc) -> Doc:
    return {k: v for k, v in doc.items() if k != "refresh_hash"}


class CliSessions:
    def __init__(self, store: DocumentStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._cache: dict[str, tuple[float, bool]] = {}

    async def create(
        self,
        *,
        subject: str,
        email: str,
        groups: tuple[str, ...],
        issuer: str,
        scope: Scope,
        ttl_seconds: int,
        client: str,
    ) -> tuple[Doc, str]:
        """A new session and its first refresh token."""
        now = self._clock()
        sid = uuid.uuid4().hex
        secret = secrets.token_urlsafe(32)
        doc = {
            "id": sid,
            "subject": subject,
            "email": email,
            "groups": list(groups),
            "issuer": issuer,
            "scope": scope,
            "client": client[:200],
            "created_at": now,
            "expires_at": now + ttl_seconds,
            "last_refreshed_at": None,
            "revoked_at": None,
            "revoked_by": None,
            "refresh_hash": secret_hash(secret),
        }
        await self._store.put_doc(
            COLLECTION, sid, doc, ttl_seconds + RETAIN_REVOKED_SECONDS, now=now
        )
        return doc, f"{sid}.{secret}"

    async def refresh(self, refresh_token: str) -> Refreshed | RefreshError:
        """Rotate: the session and its next refresh token, or why not."""
        sid, _, secret = refresh_token.partition(".")
        if not sid or not secret or len(refresh_token) > MAX_REFRESH_BYTES:
            return "invalid_grant"
        now = self._clock()
        doc = await self._store.get_doc(COLLECTION, sid, now=now)
        if doc is None:
            return "invalid_grant"
        if doc["revoked_at"] is not None or doc["expires_at"] <= now:
            return "invalid_grant"
        if not hmac.compare_digest(secret_hash(secret), doc["refresh_hash"]):
            await self.revoke(sid, "reuse-detected")
            return "reused"
        fresh = secrets.token_urlsafe(32)
        new = {**doc, "refresh_hash": secret_hash(fresh), "last_refreshed_at": now}
        ttl = max(1, int(doc["expires_at"] - now)) + RETAIN_REVOKED_SECONDS
        if not await self._store.swap_doc(COLLECTION, sid, doc, new, ttl, now=now):
            # Someone else used this very token at the same moment: one of the two is a copy.
            await self.revoke(sid, "reuse-detected")
            return "reused"
        return Refreshed(new, f"{sid}.{fresh}")

    async def get(self, sid: str) -> Doc | None:
        return await self._store.get_doc(COLLECTION, sid, now=self._clock())

    async def revoke(self, sid: str, by: str) -> tuple[Doc, Doc] | None:
        """(before, after) of a revocation; None when there is no such session."""
        for _ in range(8):
            now = self._clock()
            doc = await self._store.get_doc(COLLECTION, sid, now=now)
            if doc is None:
                return None
            if doc["revoked_at"] is not None:
                return doc, doc
            new = {**doc, "revoked_at": now, "revoked_by": by}
            if await self._store.swap_doc(
                COLLECTION, sid, doc, new, RETAIN_REVOKED_SECONDS, now=now
            ):
                self._cache.pop(sid, None)
                return doc, new
        return None

    async def revoke_by_refresh(self, refresh_token: str, by: str) -> tuple[Doc, Doc] | None:
        """Logout: revoke the session this refresh token belongs to, if it is its current
        token (a stale copy cannot log anyone else out)."""
        sid, _, secret = refresh_token.partition(".")
        if not sid or not secret or len(refresh_token) > MAX_REFRESH_BYTES:
            return None
        doc = await self._store.get_doc(COLLECTION, sid, now=self._clock())
        if doc is None or not hmac.compare_digest(secret_hash(secret), doc["refresh_hash"]):
            return None
        return await self.revoke(sid, by)

    async def live(self, sid: str) -> bool:
        """Whether access tokens of this session may still be used."""
        now = self._clock()
        hit = self._cache.get(sid)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        doc = await self._store.get_doc(COLLECTION, sid, now=now)
        alive = doc is not None and doc["revoked_at"] is None and doc["expires_at"] > now
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[sid] = (now, alive)
        return alive

    async def list(self) -> list[dict[str, Any]]:
        docs = await self._store.list_docs(COLLECTION, now=self._clock())
        return sorted((public_view(d) for d in docs), key=lambda d: d["created_at"])
