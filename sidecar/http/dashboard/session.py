"""Browser sessions for the dashboard without Access in front: `sidecar dashboard` asks for
a one-time link (valid 60 s); opening it sets a short-lived cookie that lets that browser
read the dashboard, and nothing else.

Links and sessions are store documents keyed by a SHA-256 of their secret, so any replica
can honour them and the store never holds a usable secret. A link is consumed with a
compare-and-set delete: two replicas can never both accept it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sidecar.store.base import DocumentStore

LINKS = "dashboard_links"
SESSIONS = "dashboard_sessions"
LINK_SECONDS = 60
SESSION_SECONDS = 3600
COOKIE = "sidecar_dashboard"
MAX_SECRET = 128


def _key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Opened:
    who: str
    cookie: str


class DashboardSessions:
    def __init__(self, store: DocumentStore) -> None:
        self._store = store

    async def new_link(self, who: str, now: float) -> str:
        code = secrets.token_urlsafe(32)
        await self._store.put_doc(
            LINKS, _key(code), {"who": who, "expires_at": now + LINK_SECONDS}, LINK_SECONDS, now=now
        )
        return code

    async def open(self, code: str, now: float) -> Opened | None:
        """Consume a link (once) and start a session; None if unknown, used or expired."""
        if not code or len(code) > MAX_SECRET:
            return None
        key = _key(code)
        doc = await self._store.get_doc(LINKS, key, now=now)
        if doc is None or not await self._store.swap_doc(LINKS, key, doc, None, now=now):
            return None
        if doc["expires_at"] <= now:
            return None
        cookie = secrets.token_urlsafe(32)
        await self._store.put_doc(
            SESSIONS,
            _key(cookie),
            {"who": doc["who"], "expires_at": now + SESSION_SECONDS},
            SESSION_SECONDS,
            now=now,
        )
        return Opened(str(doc["who"]), cookie)

    async def who(self, cookie: str, now: float) -> str | None:
        """The admin a session cookie was opened by, while it lasts."""
        if not cookie or len(cookie) > MAX_SECRET:
            return None
        doc = await self._store.get_doc(SESSIONS, _key(cookie), now=now)
        if doc is None or doc["expires_at"] <= now:
            return None
        return str(doc["who"])
