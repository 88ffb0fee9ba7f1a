"""The owned SQLite store's memory of buckets: what it lets go of leaves nothing behind."""

from __future__ import annotations

from sidecar.store.budget_types import BucketView, bucket_ref
from sidecar.store.sqlite_totals import _EXPIRIES_SLACK, Totals

SLOT, EXPIRES = 1_800_000_000, 1_802_592_000  # a monthly window's slot: a month to expiry


def test_buckets_let_go_of_leave_no_slot_expiries_behind() -> None:
    totals = Totals()
    for n in range(20_000):  # every caller charged once, then let go (a month to expiry)
        key = f"b:user{n}"
        totals.loaded({key: []})
        totals.add(bucket_ref(key), SLOT, 1_000, EXPIRES)
        totals.evict(100)
    assert len(totals.buckets) == 100
    assert len(totals._slot_expiries) <= 2 * 100 + _EXPIRIES_SLACK
    # The buckets kept still forget their slots when the file's housekeeping does.
    totals.prune(EXPIRES + 1)
    assert not totals._slots and not totals._slot_expiries


def test_buckets_are_kept_by_a_digest_of_their_key_and_never_share_one() -> None:
    totals = Totals()
    views = [BucketView(f"b|user=user{n}@example.com", SLOT, SLOT, 60, 100) for n in range(5000)]
    totals.loaded({v.key: [] for v in views})
    assert not totals.missing(views)
    for i, view in enumerate(views):
        totals.hold(view.ref, i)
    assert len(totals.buckets) == len(views)
    assert totals.read(views)[1] == list(range(len(views)))
    # One character more or less is another bucket, with nothing held.
    near = [BucketView(v.key + "x", SLOT, SLOT, 60, 100) for v in views[:50]]
    assert totals.missing(near) == [v.key for v in near]
    assert all(v.ref == bucket_ref(v.key) and isinstance(v.ref, int) for v in views[:10])


def test_first_expiry_is_the_earliest_open_whatever_order_reservations_came_in() -> None:
    totals = Totals()
    assert totals.first_expiry() is None
    for n, expires in enumerate((100.0, 100.0, 160.0, 130.0, 90.0, 170.0)):
        totals.opened(f"r{n}", expires)  # 130 and 90: a shorter TTL after a reload
    assert totals.first_expiry() == 90.0
    totals.ended("r4")
    assert totals.first_expiry() == 100.0
    totals.ended("r0")
    totals.ended("r1")
    assert totals.first_expiry() == 130.0
    totals.ended("r3")
    assert totals.first_expiry() == 160.0
    for rid in ("r2", "r5"):
        totals.ended(rid)
    assert totals.first_expiry() is None and totals.open_count() == 0


def test_an_entry_read_before_its_id_was_opened_again_is_not_the_current_one() -> None:
    totals = Totals()
    expires = 100.0
    totals.opened("r", expires)
    before = totals.open_entry("r")
    assert before == expires and before is not None
    totals.open_entries.pop("r")  # as if ended and forgotten, then opened again
    totals.opened("r", expires)  # the same float object given again
    assert totals.open_entry("r") == before and totals.open_entry("r") is not before
    assert totals.existing("r", "b", 50.0, (before, "b")) is False
    assert totals.existing("r", "b", 50.0, (totals.open_entry("r") or 0.0, "b")) is True


def test_expiries_queued_follow_the_open_reservations_not_all_recent_ones() -> None:
    totals = Totals()
    for n in range(10_000):
        totals.opened(f"r{n}", 1000.0 + n)
        if n % 100:
            totals.ended(f"r{n}")  # charged long before it would expire
    assert totals.open_count() == 100
    assert len(totals._queued) + len(totals._expiries) <= 2 * 100 + _EXPIRIES_SLACK
    assert totals.first_expiry() == 1000.0
