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
