"""The sidecar's own signing keys: ES256 keys kept in the store, rotated, published as a JWKS.

Every replica signs with the key the shared `active` pointer names and verifies with any
published key. A key stays published after it is retired until every token it signed has
expired: each signature first records its token's expiry on the key (`signed_until`), so
retirement knows how long to keep it, even when another replica signed with it last.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.identity.key_cache import KeyCache
from sidecar.identity.secret_box import SecretBox
from sidecar.store.base import Doc, DocumentStore

log = structlog.get_logger("sidecar.signing_keys")

KEYS = "signing_keys"
ACTIVE = "signing_key_active"
ACTIVE_ID = "current"
ALGORITHM = "ES256"
ROTATE_AFTER_SECONDS = 30 * 86_400
# Verifiers trust their copy of the key set this long; an unknown kid reloads it sooner.
CACHE_SECONDS = 300.0
# Unknown kids reload at most this often, so forged kids cannot turn into a store flood.
REFRESH_FLOOR_SECONDS = 1.0
# Compare-and-set loops give up after this many lost races (another replica is busy too).
MAX_ATTEMPTS = 8


class SigningKeyUnavailable(Exception):
    """No key could be made active (the store kept changing underneath, or is down)."""


def new_key_doc(now: float, box: SecretBox) -> Doc:
    key = ec.generate_private_key(ec.SECP256R1())
    kid = secrets.token_hex(8)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, use="sig", alg=ALGORITHM)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {
        "kid": kid,
        "alg": ALGORITHM,
        "private_sealed": box.seal(pem),
        "public_jwk": jwk,
        "created_at": now,
        "retired_at": None,
        "signed_until": now,
    }


async def seal_plain_keys(store: DocumentStore, box: SecretBox, now: float, leeway: int) -> int:
    """Encrypt private keys an earlier version stored as plain PEM; returns how many."""
    sealed = 0
    for doc in await store.list_docs(KEYS, now=now):
        pem = doc.get("private_pem")
        if not isinstance(pem, str):
            continue
        new = {k: v for k, v in doc.items() if k != "private_pem"}
        new["private_sealed"] = box.seal(pem.encode())
        # A retired key keeps its expiry; an active one never had one.
        keep = (
            None
            if doc.get("retired_at") is None
            else max(1, math.ceil(float(doc["signed_until"]) + leeway - now))
        )
        if await store.swap_doc(KEYS, doc["kid"], doc, new, ttl_seconds=keep, now=now):
            sealed += 1
    return sealed


def is_published(doc: Mapping[str, Any], now: float, leeway: int) -> bool:
    """Active keys, and retired keys while a token they signed may still be accepted."""
    return doc.get("retired_at") is None or float(doc["signed_until"]) + leeway > now


def public_jwk(doc: Mapping[str, Any]) -> dict[str, Any]:
    # Built from named public members only, so a private member can never leak through.
    jwk = doc["public_jwk"]
    return {k: jwk[k] for k in ("kty", "crv", "x", "y", "kid", "use", "alg") if k in jwk}


class SigningKeys:
    """Signs the sidecar's tokens and answers `key_for(kid)` for its JWT verifier."""

    def __init__(
        self,
        store: DocumentStore,
        *,
        box: SecretBox,
        clock: Callable[[], float] = time.time,
        leeway_seconds: int = 30,
        rotate_after_seconds: float = ROTATE_AFTER_SECONDS,
        cache_seconds: float = CACHE_SECONDS,
        refresh_floor_seconds: float = REFRESH_FLOOR_SECONDS,
    ) -> None:
        self._store = store
        self._box = box
        self._clock = clock
        self._leeway = leeway_seconds
        self._rotate_after = rotate_after_seconds
        self._cache = KeyCache(
            self, clock=clock, floor=refresh_floor_seconds, max_age=cache_seconds
        )
        self.reloads = 0

    # -- verification (hot path: memory only, except on an unknown kid) ----------------
    async def key_for(self, kid: str) -> Any | None:
        if self._cache.stale():
            await self._cache.reload(force=True)
        if kid not in self._cache.keys:
            await self._cache.reload(force=False)
        return self._cache.keys.get(kid)

    async def load_keys(self, now: float) -> dict[str, Any]:
        docs = await self._store.list_docs(KEYS, now=now)
        return {
            d["kid"]: jwt.PyJWK(public_jwk(d)).key
            for d in docs
            if is_published(d, now, self._leeway)
        }

    def keys_loaded(self, keys: dict[str, Any]) -> None:
        self.reloads += 1

    def keys_failed(self, exc: Exception) -> None:
        # A store blip: the last good keys are kept.
        log.warning("signing_keys_reload_failed", error=str(exc), kept=len(self._cache.keys))

    # -- publication -------------------------------------------------------------------
    async def jwks(self) -> dict[str, Any]:
        """Public parts of every published key, the active one first; makes one if none."""
        active = await self._usable_active()
        now = self._clock()
        docs = [
            d
            for d in await self._store.list_docs(KEYS, now=now)
            if is_published(d, now, self._leeway)
        ]
        docs.sort(key=lambda d: (d["kid"] != active["kid"], -float(d["created_at"])))
        return {"keys": [public_jwk(d) for d in docs]}

    # -- signing -----------------------------------------------------------------------
    async def sign(self, claims: Mapping[str, Any]) -> str:
        """Sign `claims` (which must carry `exp`) with the active key, rotating it when due."""
        exp = int(claims["exp"])
        for _ in range(MAX_ATTEMPTS):
            doc = await self._usable_active()
            # Record the expiry before the token exists, so the key outlives it for sure.
            extended = {**doc, "signed_until": max(float(doc["signed_until"]), float(exp))}
            if extended == doc or await self._store.swap_doc(
                KEYS, doc["kid"], doc, extended, now=self._clock()
            ):
                if "private_sealed" not in doc:
                    raise SigningKeyUnavailable(
                        f"key {doc['kid']} is stored unencrypted; restart a sidecar of this "
                        "version to encrypt it"
                    )
                key = serialization.load_pem_private_key(
                    self._box.open(doc["private_sealed"]), None
                )
                if not isinstance(key, ec.EllipticCurvePrivateKey):
                    raise SigningKeyUnavailable(f"key {doc['kid']} is not an EC key")
                return jwt.encode(
                    dict(claims), key, algorithm=ALGORITHM, headers={"kid": doc["kid"]}
                )
        raise SigningKeyUnavailable("the active signing key kept changing")

    async def rotate(self) -> str:
        """Make a new key active and retire the previous one; returns the new kid."""
        for _ in range(MAX_ATTEMPTS):
            pointer = await self._store.get_doc(ACTIVE, ACTIVE_ID, now=self._clock())
            kid = await self._rotate_from(pointer)
            if kid is not None:
                return kid
        raise SigningKeyUnavailable("another replica kept rotating at the same time")

    async def _usable_active(self) -> Doc:
        for _ in range(MAX_ATTEMPTS):
            now = self._clock()
            pointer = await self._store.get_doc(ACTIVE, ACTIVE_ID, now=now)
            doc = (
                None
                if pointer is None
                else await self._store.get_doc(KEYS, pointer["kid"], now=now)
            )
            if (
                doc is not None
                and doc["retired_at"] is None
                and now - float(doc["created_at"]) < self._rotate_after
            ):
                return doc
            await self._rotate_from(pointer)
        raise SigningKeyUnavailable("no active signing key")

    async def _rotate_from(self, pointer: Doc | None) -> str | None:
        """Replace `pointer` by a new key; None when another replica changed it first."""
        now = self._clock()
        doc = new_key_doc(now, self._box)
        await self._store.put_doc(KEYS, doc["kid"], doc, now=now)
        if not await self._store.swap_doc(
            ACTIVE, ACTIVE_ID, pointer, {"kid": doc["kid"], "since": now}, now=now
        ):
            await self._store.delete_doc(KEYS, doc["kid"])
            return None
        previous = None if pointer is None else str(pointer["kid"])
        if previous is not None:
            await self._retire(previous)
        self._cache.expire()
        log.info("signing_key_rotated", kid=doc["kid"], previous_kid=previous)
        return str(doc["kid"])

    async def _retire(self, kid: str) -> None:
        for _ in range(MAX_ATTEMPTS):
            now = self._clock()
            doc = await self._store.get_doc(KEYS, kid, now=now)
            if doc is None or doc["retired_at"] is not None:
                return
            retired = {**doc, "retired_at": now}
            # The store forgets the key by itself once its last token can no longer pass.
            keep = math.ceil(float(doc["signed_until"]) + self._leeway - now)
            if keep <= 0:
                done = await self._store.swap_doc(KEYS, kid, doc, None, now=now)
            else:
                done = await self._store.swap_doc(
                    KEYS, kid, doc, retired, ttl_seconds=keep, now=now
                )
            if done:
                return
