"""One object for equal values that many cached things hold (a plan's rule names, a
caller's group list): kept in a table bounded in count, which starts again when full."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class SharedValues(Generic[K]):
    def __init__(self, bound: int) -> None:
        self._bound = bound
        self._kept: dict[K, K] = {}

    def __call__(self, value: K, make: Callable[[K], K] | None = None) -> K:
        """The one object kept equal to `value` (`make(value)`, or `value`, the first time)."""
        found = self._kept.get(value)
        if found is None:
            if len(self._kept) >= self._bound:
                self._kept.clear()
            found = make(value) if make is not None else value
            self._kept[found] = found
        return found
