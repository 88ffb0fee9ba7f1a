"""Failed-attempt limits (wrong device codes, wrong admin credentials) counted in the shared
store, so a limit holds across replicas and restarts."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sidecar.store.base import DocumentStore


@dataclass(frozen=True)
class Limit:
    name: str
    limit: int
    window_seconds: int


# One limit applied to one subject (an address, a hashed identity).
Check = tuple[Limit, str]


def subject_of(issuer: str, subject: str) -> str:
    """A short, fixed-size key part for an identity, whatever its issuer and subject hold."""
    return hashlib.sha256(f"{issuer}\x00{subject}".encode()).hexdigest()[:32]


class Attempts:
    """Fixed windows aligned to the clock: every replica computes the same counter key, and
    the time until a refused caller may try again is known without asking the store."""

    def __init__(self, store: DocumentStore, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock

    def _key(self, check: Check, now: float) -> str:
        limit, subject = check
        return f"attempts:{limit.name}:{subject}:{int(now // limit.window_seconds)}"

    async def retry_after(self, checks: Sequence[Check]) -> int | None:
        """Seconds until the longest-blocked of `checks` reopens; None when none is full."""
        now = self._clock()
        wait: int | None = None
        for check in checks:
            limit = check[0]
            count = await self._store.incr(self._key(check, now), 0, limit.window_seconds, now=now)
            if count >= limit.limit:
                window_end = (now // limit.window_seconds + 1) * limit.window_seconds
                seconds = max(1, math.ceil(window_end - now))
                wait = seconds if wait is None else max(wait, seconds)
        return wait

    async def failed(self, checks: Sequence[Check]) -> None:
        now = self._clock()
        for check in checks:
            await self._store.incr(self._key(check, now), 1, check[0].window_seconds, now=now)
