"""Budget windows: which slice of time a spend counts in, as plain Unix-second integers.

Everything here is pure: each method takes the current time as `now` (Unix seconds) and no
clock is read, so windows are tested at any instant without waiting.

Budget stores keep spend in slots keyed by the slot's id, which is its start time. A bucket's
spend is the sum of the slots whose id is at least `since(now)`; spend is added to `slot(now)`.
A fixed window has one slot, the whole window; a rolling window has up to 60.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Period = Literal["daily", "weekly", "monthly"]

_PERIODS: tuple[Period, ...] = ("daily", "weekly", "monthly")
_HOUR = 3600
_DAY = 24 * _HOUR
# The longest each calendar window can be: a DST change lengthens a local day by an hour.
_LONGEST_SECONDS: Mapping[Period, int] = {
    "daily": _DAY + _HOUR,
    "weekly": 7 * _DAY + _HOUR,
    "monthly": 31 * _DAY + _HOUR,
}
# Keys outlive their window a little so a late write or a skewed replica clock finds them.
_TTL_SLACK_SECONDS = _HOUR
# A calendar window's key TTL: one int per period, shared by every plan that names one.
_FIXED_TTL: Mapping[Period, int] = {p: s + _TTL_SLACK_SECONDS for p, s in _LONGEST_SECONDS.items()}
_MAX_SLOTS = 60


class Window(Protocol):
    """What a budget store needs to know about a window."""

    def slot(self, now: float) -> int: ...
    def since(self, now: float) -> int: ...
    def resets_at(self, now: float) -> int: ...
    def retry_after(self, now: float, slots: Mapping[int, int], needed: int) -> int: ...
    def window_id(self, now: float) -> str: ...
    def ttl_seconds(self) -> int: ...


@dataclass(frozen=True, slots=True)
class FixedWindow:
    """A calendar window in a time zone: a local day, a week from Monday 00:00, or a month from
    the 1st 00:00. Boundaries follow the zone's DST rules, so a local day lasts 23 to 25 hours."""

    period: Period
    timezone: str = "UTC"
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)
    # (whole second, slot) of the last call. Every request asks for the slot of nearly the
    # same instant, and the time-zone conversion costs a few µs each time; zone offsets are
    # whole seconds, so the answer cannot change within one second.
    _last: list[tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.period not in _PERIODS:
            raise ValueError(f"unknown window period {self.period!r}: expected one of {_PERIODS}")
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {self.timezone!r}") from exc
        object.__setattr__(self, "_zone", zone)
        object.__setattr__(self, "_last", [(-1, 0)])

    def slot(self, now: float) -> int:
        second = math.floor(now)
        last_second, last_slot = self._last[0]
        if second == last_second:
            return last_slot
        slot = self._midnight(self._start_date(second))
        if slot == last_slot:
            # The same int as before: cached plans keep their slots, one object per window.
            slot = last_slot
        self._last[0] = (second, slot)
        return slot

    def since(self, now: float) -> int:
        return self.slot(now)

    def resets_at(self, now: float) -> int:
        return self._midnight(self._next_start_date(self._start_date(now)))

    def retry_after(self, now: float, slots: Mapping[int, int], needed: int) -> int:
        """Seconds to the next window: nothing ages out of a fixed window before it resets."""
        return max(1, math.ceil(self.resets_at(now) - now))

    def window_id(self, now: float) -> str:
        start = self._start_date(now)
        if self.period == "daily":
            return start.isoformat()
        if self.period == "weekly":
            iso = start.isocalendar()
            return f"{iso.year:04d}-W{iso.week:02d}"
        return f"{start.year:04d}-{start.month:02d}"

    def ttl_seconds(self) -> int:
        return _FIXED_TTL[self.period]

    def _start_date(self, now: float) -> date:
        local = datetime.fromtimestamp(now, self._zone).date()
        if self.period == "daily":
            return local
        if self.period == "weekly":
            return local - timedelta(days=local.weekday())
        return local.replace(day=1)

    def _next_start_date(self, start: date) -> date:
        if self.period == "daily":
            return start + timedelta(days=1)
        if self.period == "weekly":
            return start + timedelta(days=7)
        if start.month == 12:
            return date(start.year + 1, 1, 1)
        return date(start.year, start.month + 1, 1)

    def _midnight(self, day: date) -> int:
        # Where DST skips midnight, zoneinfo reads the missing 00:00 with the offset before the
        # change, which is the instant the day's first existing minute begins.
        return int(datetime(day.year, day.month, day.day, tzinfo=self._zone).timestamp())


@dataclass(frozen=True, slots=True)
class RollingWindow:
    """The last `seconds` seconds, kept as at most 60 slots of `slot_seconds` each.

    Precision: `slot_seconds` is `seconds / 60` rounded up (at least 1 s), and spend ages out a
    whole slot at a time, when the slot it was added to leaves the window. Spend made at time t
    is counted until `slot(t) + span`, where `span = slot_count * slot_seconds` is between
    `seconds` and `seconds + slot_seconds`; so it is forgotten between `span - slot_seconds` and
    `span` seconds after it was made, within one slot (1/60 of the window) of `seconds`. A 24h
    window has 24-minute slots.
    """

    seconds: int
    slot_seconds: int = field(init=False)
    slot_count: int = field(init=False)
    # The last (slot, since) given: the same int objects while the slot lasts, so cached
    # plans share them (one pair per window rather than per plan).
    _last: list[tuple[int, int]] = field(init=False, repr=False, compare=False)
    _ttl: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, int) or self.seconds < 1:
            raise ValueError(
                f"a rolling window needs a positive whole number of seconds, got {self.seconds!r}"
            )
        slot_seconds = -(-self.seconds // _MAX_SLOTS)
        object.__setattr__(self, "slot_seconds", slot_seconds)
        object.__setattr__(self, "slot_count", -(-self.seconds // slot_seconds))
        object.__setattr__(self, "_last", [(-1, -1)])
        span = self.slot_count * slot_seconds
        # The slack is at most the window's own span: a slot of a 10-second or 1-minute
        # window kept an hour would make a busy bucket hold thousands of dead slots.
        object.__setattr__(self, "_ttl", span + min(_TTL_SLACK_SECONDS, span))

    @property
    def span(self) -> int:
        """Seconds a slot stays in the window, counted from its start."""
        return self.slot_count * self.slot_seconds

    def slot(self, now: float) -> int:
        slot = int(now // self.slot_seconds) * self.slot_seconds
        last = self._last[0]
        if slot == last[0]:
            return last[0]
        self._last[0] = (slot, slot - (self.slot_count - 1) * self.slot_seconds)
        return slot

    def since(self, now: float) -> int:
        slot = self.slot(now)
        last = self._last[0]
        return last[1] if last[0] == slot else slot - (self.slot_count - 1) * self.slot_seconds

    def resets_at(self, now: float) -> int:
        """When the oldest slot leaves the window: the earliest any spend can age out."""
        return self.slot(now) + self.slot_seconds

    def retry_after(self, now: float, slots: Mapping[int, int], needed: int) -> int:
        """Seconds until the slots leaving the window add up to `needed` µUSD.

        When even all of the current spend leaving is not enough (the reservation is larger
        than what has been spent), the answer is when the current slot has left too.
        """
        if needed <= 0:
            return 1
        since = self.since(now)
        freed = 0
        for slot_id in sorted(s for s in slots if s >= since):
            freed += slots[slot_id]
            if freed >= needed:
                return max(1, math.ceil(slot_id + self.span - now))
        return max(1, math.ceil(self.slot(now) + self.span - now))

    def window_id(self, now: float) -> str:
        return "rolling"

    def ttl_seconds(self) -> int:
        return self._ttl


_DURATION = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_UNIT_SECONDS = (_DAY, _HOUR, 60, 1)


def parse_duration(text: str) -> int:
    """Seconds in a duration such as `30s`, `15m`, `24h`, `7d` or `1h30m`."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if not text or match is None:
        raise ValueError(
            f"invalid duration {text!r}: expected whole numbers with units d, h, m, s, "
            "largest first, such as 30s, 15m, 24h, 7d or 1h30m"
        )
    seconds = sum(
        int(count) * unit
        for count, unit in zip(match.groups(), _UNIT_SECONDS, strict=True)
        if count
    )
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be longer than zero")
    return seconds
