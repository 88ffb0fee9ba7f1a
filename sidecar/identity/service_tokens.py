"""Service tokens issued by the sidecar: one named, revocable identity per agent or pipeline.

Only a SHA-256 of the secret is stored: secrets are 256 random bits, so a fast hash is
enough (there is nothing to brute-force), and comparison is constant-time.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.identity.errors import AuthError
from sidecar.identity.secret_hash import secret_hash
from sidecar.model import Identity
from sidecar.store.base import DocumentStore

COLLECTION = "service_tokens"
# name → client id of the token holding it: claimed atomically, so names stay unique across
# replicas. Released on revocation; a revoked token keeps its name in its own record.
NAMES = "service_token_names"
# How long a looked-up token may be served from memory: bounds how late a revocation made
# through another replica takes effect.
CACHE_SECONDS = 0.5
# Last-use times are written at most this often per token, off the request path.
LAST_USED_WRITE_SECONDS = 60.0


@dataclass(frozen=True)
class IssuedToken:
    id: str
    name: str
    client_id: str
    client_secret: str
    groups: tuple[str, ...]
    expires_at: float | None


def public_view(doc: dict[str, Any]) -> dict[str, Any]:
    """What the API and CLI may show: everything but the hash."""
    return {k: v for k, v in doc.items() if k != "secret_hash"}


class NameTaken(Exception):
    """Another live service token already has this name."""


class ServiceTokens:
    def __init__(self, store: DocumentStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._last_written: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def create(
        self, name: str, groups: Sequence[str] = (), ttl_seconds: int | None = None
    ) -> IssuedToken:
        """A new token; NameTaken when a live token already has `name`."""
        now = self._clock()
        token_id = uuid.uuid4().hex
        client_id = f"{secrets.token_hex(16)}.access"
        secret = secrets.token_urlsafe(32)
        expires = None if ttl_seconds is None else now + ttl_seconds
        if await self._live_named(name) is not None or not await self._store.swap_doc(
            NAMES, name, None, {"client_id": client_id}, now=now
        ):
            raise NameTaken(name)
        doc = {
            "id": token_id,
            "name": name,
            "client_id": client_id,
            "secret_hash": secret_hash(secret),
            "groups": list(groups),
            "created_at": now,
            "expires_at": expires,
            "revoked_at": None,
            "last_used_at": None,
        }
        await self._store.put_doc(COLLECTION, client_id, doc, now=now)
        return IssuedToken(token_id, name, client_id, secret, tuple(groups), expires)

    async def _live_named(self, name: str) -> dict[str, Any] | None:
        # Tokens made before names were claimed have no entry in NAMES; look at them too.
        for doc in await self._store.list_docs(COLLECTION, now=self._clock()):
            if doc["name"] == name and doc["revoked_at"] is None:
                return doc
        return None

    async def rotate(self, ref: str) -> IssuedToken | None:
        """A new secret for a live token (same id, name, groups and expiry); the old secret
        stops working at once. None when no live token has this id or name."""
        doc = await self.find(ref)
        if doc is None or doc["revoked_at"] is not None:
            return None
        secret = secrets.token_urlsafe(32)
        now = self._clock()
        new = {**doc, "secret_hash": secret_hash(secret), "rotated_at": now}
        if not await self._store.swap_doc(COLLECTION, doc["client_id"], doc, new, now=now):
            return None
        self._cache.pop(doc["client_id"], None)
        return IssuedToken(
            doc["id"],
            doc["name"],
            doc["client_id"],
            secret,
            tuple(doc["groups"]),
            doc["expires_at"],
        )

    async def list(self) -> list[dict[str, Any]]:
        docs = await self._store.list_docs(COLLECTION, now=self._clock())
        return sorted((public_view(d) for d in docs), key=lambda d: d["created_at"])

    async def find(self, ref: str) -> dict[str, Any] | None:
        """The token with this id or client id, else the live one (else the latest) with this
        name."""
        docs = await self._store.list_docs(COLLECTION, now=self._clock())
        for doc in docs:
            if doc["id"] == ref or doc["client_id"] == ref:
                return doc
        named = sorted(
            (d for d in docs if d["name"] == ref),
            key=lambda d: (d["revoked_at"] is None, d["created_at"]),
        )
        return named[-1] if named else None

    async def revoke(self, token_id: str) -> dict[str, Any] | None:
        doc = await self.find(token_id)
        if doc is None:
            return None
        if doc["revoked_at"] is None:
            now = self._clock()
            doc = {**doc, "revoked_at": now}
            await self._store.put_doc(COLLECTION, doc["client_id"], doc, now=now)
            await self._store.swap_doc(
                NAMES, doc["name"], {"client_id": doc["client_id"]}, None, now=now
            )
        self._cache.pop(doc["client_id"], None)
        return public_view(doc)

    async def _lookup(self, client_id: str) -> dict[str, Any] | None:
        now = self._clock()
        hit = self._cache.get(client_id)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        doc = await self._store.get_doc(COLLECTION, client_id, now=now)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[client_id] = (now, doc)
        return doc

    async def authenticate(self, client_id: str, client_secret: str) -> Identity:
        if len(client_id) > 256 or len(client_secret) > 256:
            raise AuthError("malformed", "service token too long")
        doc = await self._lookup(client_id)
        # Hash even when the id is unknown so timing says nothing about which ids exist.
        presented = secret_hash(client_secret)
        expected = doc["secret_hash"] if doc else secret_hash("")
        if doc is None or not hmac.compare_digest(presented, expected):
            raise AuthError("bad_service_token", "unknown client id or wrong secret")
        now = self._clock()
        if doc["revoked_at"] is not None:
            raise AuthError("revoked", "service token was revoked")
        if doc["expires_at"] is not None and doc["expires_at"] <= now:
            raise AuthError("expired", "service token expired")
        self._touch(doc, now)
        return Identity(
            kind="service",
            subject=doc["id"],
            groups=tuple(doc["groups"]),
            token_name=doc["name"],
            issuer="sidecar",
        )

    def _touch(self, doc: dict[str, Any], now: float) -> None:
        client_id = doc["client_id"]
        if now - self._last_written.get(client_id, 0.0) < LAST_USED_WRITE_SECONDS:
            return
        self._last_written[client_id] = now

        async def write() -> None:
            current = await self._store.get_doc(COLLECTION, client_id, now=now)
            if current is not None:
                # Compare-and-set so a concurrent revoke is never overwritten.
                await self._store.swap_doc(
                    COLLECTION, client_id, current, {**current, "last_used_at": now}, now=now
                )

        task = asyncio.get_running_loop().create_task(write())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
