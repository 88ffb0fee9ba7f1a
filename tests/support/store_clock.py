"""The clock of a document-store test, for every backend."""

from __future__ import annotations


class StoreClock:
    """The `now` a test passes to the store. Every backend judges document and counter
    expiry by the `now` it is given, so `advance` only moves it: expiry is tested at the
    boundary the TTL sets, never by waiting for it."""

    def __init__(self, start: float) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    async def advance(self, seconds: float) -> None:
        self._now += seconds
