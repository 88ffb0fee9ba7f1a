"""Signing keys of one issuer: fetched, cached, refreshed on an unknown kid, kept on failure."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import jwt
import structlog

from sidecar import tracing
from sidecar.identity.key_cache import KeyCache
from sidecar.metrics import JWKS_REFRESHES

log = structlog.get_logger("sidecar.jwks")

Fetcher = Callable[[str], Awaitable[dict[str, Any]]]


async def http_fetch(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        response = await client.get(url)
        response.raise_for_status()
        data = response.json()
    if not isinstance(data, dict):
        raise ValueError("JWKS document is not an object")
    return data


def _where(url: str | None) -> str:
    """The URL without user info or query, which could carry a credential (for traces)."""
    if not url:
        return ""
    parts = urlsplit(url)
    host = f"{parts.hostname or ''}:{parts.port}" if parts.port else parts.hostname or ""
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def parse_jwks(doc: dict[str, Any]) -> dict[str, Any]:
    """kid → key object. Keys without a kid are kept under '' (single-key issuers)."""
    keys: dict[str, Any] = {}
    for jwk in doc.get("keys", []):
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(jwk).key
        except (jwt.PyJWKError, ValueError, TypeError):
            # One malformed key must not take down the others.
            continue
        keys[str(jwk.get("kid", ""))] = key
    return keys


class JwksCache:
    def __init__(
        self,
        *,
        url: str | None = None,
        file: str | None = None,
        refresh_floor_seconds: float = 30.0,
        cache_seconds: float = 3600.0,
        fetch: Fetcher = http_fetch,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._file = file
        self._fetch = fetch
        self._cache = KeyCache(
            self, clock=clock, floor=refresh_floor_seconds, max_age=cache_seconds
        )
        self.refreshes = 0
        self.failures = 0

    async def key_for(self, kid: str) -> Any | None:
        """The key for `kid`, refreshing at most once per floor when it is unknown."""
        if self._cache.stale():
            await self._cache.reload(force=self._cache.loaded_at is None)
        key = self._lookup(kid)
        if key is None:
            await self._cache.reload(force=False)
            key = self._lookup(kid)
        return key

    def _lookup(self, kid: str) -> Any | None:
        keys = self._cache.keys
        if kid in keys:
            return keys[kid]
        if not kid and len(keys) == 1:
            return next(iter(keys.values()))
        return None

    async def load_keys(self, now: float) -> dict[str, Any]:
        with tracing.span("sidecar.jwks.fetch", source=self._file or _where(self._url)):
            if self._file is not None:
                doc = json.loads(Path(self._file).read_text(encoding="utf-8"))
            else:
                assert self._url is not None
                doc = await self._fetch(self._url)
            keys = parse_jwks(doc)
            if not keys:
                raise ValueError("no usable signing keys")
        return keys

    def keys_loaded(self, keys: dict[str, Any]) -> None:
        self.refreshes += 1
        JWKS_REFRESHES.labels("ok").inc()
        log.info("jwks_refreshed", source=self._url or self._file, keys=len(keys))

    def keys_failed(self, exc: Exception) -> None:
        self.failures += 1
        JWKS_REFRESHES.labels("error").inc()
        log.warning(
            "jwks_refresh_failed",
            source=self._url or self._file,
            error=str(exc),
            kept_keys=len(self._cache.keys),
        )
