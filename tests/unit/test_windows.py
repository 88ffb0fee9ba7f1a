"""Calendar and rolling budget windows at explicit instants, and duration parsing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sidecar.policy.windows import FixedWindow, RollingWindow, Window, parse_duration

HOUR = 3600
DAY = 24 * HOUR


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())


# --- fixed windows -------------------------------------------------------------------------


def test_daily_utc_window() -> None:
    window = FixedWindow("daily")
    now = utc(2026, 11, 22, 13, 45) + 0.5

    assert window.slot(now) == window.since(now) == utc(2026, 11, 22)
    assert window.resets_at(now) == utc(2026, 11, 23)
    assert window.window_id(now) == "2026-11-22"
    assert window.retry_after(now, {}, 1) == utc(2026, 11, 23) - utc(2026, 11, 22, 13, 45)


def test_daily_new_york_spring_forward_day_has_23_hours() -> None:
    window = FixedWindow("daily", "America/New_York")
    # 2026-03-08 starts at 00:00 EST (05:00 UTC); the next day at 00:00 EDT (04:00 UTC).
    now = utc(2026, 3, 8, 12)

    assert window.slot(now) == utc(2026, 3, 8, 5)
    assert window.resets_at(now) == utc(2026, 3, 9, 4)
    assert window.resets_at(now) - window.slot(now) == 23 * HOUR
    assert window.window_id(now) == "2026-03-08"


def test_daily_new_york_fall_back_day_has_25_hours() -> None:
    window = FixedWindow("daily", "America/New_York")
    # 2026-11-01 starts at 00:00 EDT (04:00 UTC); the next day at 00:00 EST (05:00 UTC).
    first_one_am = utc(2026, 11, 1, 5, 30)
    second_one_am = utc(2026, 11, 1, 6, 30)

    for now in (first_one_am, second_one_am):
        assert window.slot(now) == utc(2026, 11, 1, 4)
        assert window.resets_at(now) == utc(2026, 11, 2, 5)
        assert window.window_id(now) == "2026-11-01"
    assert window.resets_at(first_one_am) - window.slot(first_one_am) == 25 * HOUR


def test_daily_boundaries_are_local_midnight() -> None:
    window = FixedWindow("daily", "America/New_York")
    midnight = utc(2026, 11, 22, 5)

    assert window.slot(midnight - 1) == utc(2026, 11, 21, 5)
    assert window.slot(midnight) == midnight
    assert window.window_id(midnight - 1) == "2026-11-21"
    assert window.window_id(midnight) == "2026-11-22"
    assert window.retry_after(midnight - 0.25, {}, 10**9) == 1


def test_day_whose_midnight_does_not_exist_starts_when_the_clock_jumps() -> None:
    # Santiago skips from 2026-09-05 24:00 (UTC-4) to 2026-09-06 01:00 (UTC-3).
    window = FixedWindow("daily", "America/Santiago")
    now = utc(2026, 9, 6, 12)

    assert window.slot(now) == utc(2026, 9, 6, 4)
    assert window.resets_at(now) == utc(2026, 9, 7, 3)
    assert window.slot(utc(2026, 9, 6, 4) - 1) == utc(2026, 9, 5, 4)


def test_weekly_tokyo_window_starts_monday_local() -> None:
    window = FixedWindow("weekly", "Asia/Tokyo")
    # Monday 2026-11-16 00:00 JST is Sunday 2026-11-15 15:00 UTC.
    monday = utc(2026, 11, 15, 15)

    assert window.slot(monday) == monday
    assert window.slot(monday - 1) == monday - 7 * DAY
    assert window.slot(utc(2026, 11, 22, 14, 59, 59)) == monday  # Sunday 23:59:59 JST
    assert window.resets_at(monday) == monday + 7 * DAY
    assert window.window_id(monday) == "2026-W47"
    assert window.window_id(monday - 1) == "2026-W46"


def test_weekly_window_across_dst_in_new_york_is_one_hour_longer() -> None:
    window = FixedWindow("weekly", "America/New_York")
    now = utc(2026, 11, 1, 12)  # Sunday, the day DST ends

    assert window.slot(now) == utc(2026, 10, 26, 4)  # Monday 00:00 EDT
    assert window.resets_at(now) == utc(2026, 11, 2, 5)  # Monday 00:00 EST
    assert window.resets_at(now) - window.slot(now) == 7 * DAY + HOUR


def test_weekly_id_uses_the_iso_week_year() -> None:
    window = FixedWindow("weekly")

    # 2027-01-02 is the Saturday of ISO week 53 of 2026.
    assert window.window_id(utc(2027, 1, 2)) == "2026-W53"
    assert window.slot(utc(2027, 1, 2)) == utc(2026, 12, 28)
    assert window.window_id(utc(2027, 1, 4)) == "2027-W01"


def test_monthly_window_from_january_31_to_february_1() -> None:
    window = FixedWindow("monthly")
    last_second = utc(2026, 1, 31, 23, 59, 59)

    assert window.slot(last_second) == utc(2026, 1, 1)
    assert window.resets_at(last_second) == utc(2026, 2, 1)
    assert window.window_id(last_second) == "2026-01"
    assert window.slot(last_second + 1) == utc(2026, 2, 1)
    assert window.window_id(last_second + 1) == "2026-02"


@pytest.mark.parametrize(
    ("year", "days"),
    [(2027, 28), (2028, 29)],
)
def test_february_length_in_common_and_leap_years(year: int, days: int) -> None:
    window = FixedWindow("monthly")
    now = utc(year, 2, days, 12)

    assert window.slot(now) == utc(year, 2, 1)
    assert window.resets_at(now) == utc(year, 3, 1)
    assert window.resets_at(now) - window.slot(now) == days * DAY


def test_monthly_window_from_december_to_january_in_a_zone() -> None:
    window = FixedWindow("monthly", "America/New_York")
    new_years_eve_local = utc(2027, 1, 1, 3)  # 2026-12-31 22:00 EST

    assert window.window_id(new_years_eve_local) == "2026-12"
    assert window.slot(new_years_eve_local) == utc(2026, 12, 1, 5)
    assert window.resets_at(new_years_eve_local) == utc(2027, 1, 1, 5)
    assert window.window_id(utc(2027, 1, 1, 5)) == "2027-01"


def test_fixed_window_ttl_covers_the_longest_window() -> None:
    assert FixedWindow("daily").ttl_seconds() > 25 * HOUR
    assert FixedWindow("weekly").ttl_seconds() > 7 * DAY + HOUR
    assert FixedWindow("monthly").ttl_seconds() > 31 * DAY + HOUR


def test_fixed_window_rejects_bad_zone_and_period() -> None:
    with pytest.raises(ValueError, match="Mars/Olympus"):
        FixedWindow("daily", "Mars/Olympus")
    with pytest.raises(ValueError, match="hourly"):
        FixedWindow("hourly", "UTC")  # type: ignore[arg-type]


def test_fixed_windows_compare_by_value() -> None:
    assert FixedWindow("daily", "Asia/Tokyo") == FixedWindow("daily", "Asia/Tokyo")
    assert hash(FixedWindow("daily", "Asia/Tokyo")) == hash(FixedWindow("daily", "Asia/Tokyo"))
    assert FixedWindow("daily", "Asia/Tokyo") != FixedWindow("daily", "UTC")


# --- rolling windows -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "slot_seconds", "slot_count"),
    [
        (DAY, 1_440, 60),
        (HOUR, 60, 60),
        (90, 2, 45),
        (61, 2, 31),
        (30, 1, 30),
        (1, 1, 1),
        (7 * DAY, 10_080, 60),
    ],
)
def test_rolling_slot_size_keeps_at_most_60_slots(
    seconds: int, slot_seconds: int, slot_count: int
) -> None:
    window = RollingWindow(seconds)

    assert (window.slot_seconds, window.slot_count) == (slot_seconds, slot_count)
    assert window.span - window.slot_seconds < seconds <= window.span


def test_rolling_slot_math() -> None:
    window = RollingWindow(DAY)
    now = 1_000_000.5

    assert window.slot(now) == 999_360  # 694 * 1440
    assert window.since(now) == 999_360 - 59 * 1_440
    assert window.resets_at(now) == 999_360 + 1_440
    assert window.window_id(now) == "rolling"
    assert window.ttl_seconds() > DAY


def test_rolling_spend_is_counted_for_between_span_minus_a_slot_and_span() -> None:
    window = RollingWindow(90)  # 45 slots of 2 s
    for spent_at in (1_000, 1_001, 1_001.9):
        counted = [t for t in range(900, 1_200) if window.slot(spent_at) >= window.since(t)]
        counted_for = max(counted) + 1 - spent_at

        assert min(counted) <= spent_at
        assert 90 - 2 < counted_for <= 90


def test_rolling_retry_after_walks_slots_from_the_oldest() -> None:
    window = RollingWindow(HOUR)  # 60 slots of 60 s
    now = 7_230.0  # slot 7200; the window holds slots 3660 .. 7200
    slots = {3_600: 500, 3_660: 100, 5_400: 200, 7_200: 300}

    assert window.since(now) == 3_660
    assert window.retry_after(now, slots, 50) == 3_660 + HOUR - 7_230
    assert window.retry_after(now, slots, 100) == 3_660 + HOUR - 7_230
    assert window.retry_after(now, slots, 101) == 5_400 + HOUR - 7_230
    assert window.retry_after(now, slots, 600) == 7_200 + HOUR - 7_230
    # More than all counted spend: nothing earlier than the current slot leaving helps.
    assert window.retry_after(now, slots, 601) == 7_200 + HOUR - 7_230
    assert window.retry_after(now, {}, 1) == 7_200 + HOUR - 7_230


def test_rolling_retry_after_is_at_least_one_second() -> None:
    window = RollingWindow(HOUR)

    assert window.retry_after(7_259.5, {3_660: 100}, 100) == 1
    assert window.retry_after(7_259.5, {3_660: 100}, 0) == 1


def test_rolling_window_rejects_non_positive_lengths() -> None:
    for bad in (0, -5):
        with pytest.raises(ValueError, match="positive"):
            RollingWindow(bad)


def test_both_windows_satisfy_the_store_interface() -> None:
    windows: list[Window] = [FixedWindow("daily"), RollingWindow(HOUR)]
    now = utc(2026, 11, 22, 10)

    for window in windows:
        assert window.since(now) <= window.slot(now) <= now < window.resets_at(now)


# --- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("24h", DAY),
        ("7d", 7 * DAY),
        ("1h30m", 5_400),
        ("1d2h3m4s", DAY + 2 * HOUR + 3 * 60 + 4),
        ("90m", 5_400),
        ("0h1s", 1),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "30", "s", "0s", "0h0m", "-5m", "1.5h", "30m1h", "1H", " 30s", "30 s", "1w", "٣s", "1h30"],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_short_rolling_windows_keep_slots_about_one_window_past_their_span() -> None:
    ten = RollingWindow(10)
    assert (ten.slot_seconds, ten.slot_count, ten.span) == (1, 10, 10)
    # Spend is forgotten after 10 s and its slot dropped by 20 s, not kept for an hour.
    assert ten.ttl_seconds() == 20
    assert RollingWindow(60).ttl_seconds() == 120
    assert RollingWindow(DAY).ttl_seconds() == DAY + HOUR


def test_calls_within_one_slot_give_the_same_int_objects_and_the_next_slot_new_values() -> None:
    # Cached plans keep these ints: one object per window and slot, not one per plan.
    start = datetime(2026, 3, 4, 10, 0, tzinfo=UTC).timestamp()
    rolling = RollingWindow(3600)
    first = (rolling.slot(start), rolling.since(start), rolling.ttl_seconds())
    later = (rolling.slot(start + 59), rolling.since(start + 59), rolling.ttl_seconds())
    assert all(a is b for a, b in zip(first, later, strict=True))
    assert first == (int(start), int(start) - 59 * 60, 7200)
    assert (rolling.slot(start + 60), rolling.since(start + 60)) == (first[0] + 60, first[1] + 60)
    daily = FixedWindow("daily")
    assert daily.slot(start) is daily.slot(start + 7.5) is daily.since(start + 3600)
    assert daily.ttl_seconds() is FixedWindow("daily").ttl_seconds()
    assert daily.slot(start + 86_400) == daily.slot(start) + 86_400
