"""The owned SQLite store's memory of buckets: what it lets go of leaves nothing behind."""

from __future__ import annotations

from sidecar.store.sqlite_totals import _EXPIRIES_SLACK, Totals

SLOT, EXPIRES = 1_800_000_000, 1_802_592_000  # a monthly window's slot: a month to expiry


def test_buckets_let_go_of_leave_no_slot_expiries_behind() -> None:
    totals = Totals()
    for n in range(20_000):  # every caller charged once, then let go (a month to expiry)
        key = f"b:user{n}"
        totals.loaded({key: []})
        totals.add(key, SLOT, 1_000, EXPIRES)
        totals.evict(100)
    assert len(totals.buckets) == 100
    assert len(totals._slot_expiries) <= 2 * 100 + _EXPIRIES_SLACK
    # The buckets kept still forget their slots when the file's housekeeping does.
    totals.prune(EXPIRES + 1)
    assert not totals._slots and not totals._slot_expiries
