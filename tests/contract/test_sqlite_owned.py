"""A SQLite file owned by one process: its lock, its journal, and memory equal to the file.

The contract every store keeps runs against this store too (the `sqlite-owned` backend of
the `store` fixture); these are what only it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.model import TokenUsage
from sidecar.store.base import StoreUnavailable
from sidecar.store.budget_types import BucketView
from sidecar.store.factory import open_store
from sidecar.store.sqlite_journal import Journal
from sidecar.store.sqlite_owned import OwnedSQLiteStore
from sidecar.store.sqlite_store import SQLiteStore
from sidecar.store.sqlite_totals import Totals
from tests.support.reserve import reserve_request

NOW = 1_800_000_000.0
B = BucketView(key="b:own", slot=1_799_996_400, since=1_799_996_400, ttl_seconds=90_000, limit=100)
C = BucketView(key="b:other", slot=1_799_996_400, since=1_799_996_400, ttl_seconds=90_000, limit=50)


def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/own.db"


@contextlib.asynccontextmanager
async def owned(tmp_path: Path) -> AsyncIterator[OwnedSQLiteStore]:
    """The owned store on the test's file, opened, closed at the end."""
    store = OwnedSQLiteStore(url(tmp_path))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def file_state(tmp_path: Path, *buckets: BucketView) -> list[tuple[int, int]]:
    """Spent and held per bucket as the file says, read by a store that claims nothing."""
    plain = SQLiteStore(url(tmp_path))
    await plain.open()
    try:
        return [(s.spent, s.reserved) for s in await plain.bucket_states(list(buckets), NOW)]
    finally:
        await plain.close()


async def test_a_second_owner_or_a_shared_user_is_refused_until_the_owner_closes(
    tmp_path: Path,
) -> None:
    owner = await open_store(url(tmp_path), owner=True)
    with pytest.raises(StoreUnavailable, match="only user"):
        await open_store(url(tmp_path), owner=True)
    with pytest.raises(StoreUnavailable, match="shared: true"):
        await open_store(url(tmp_path), owner=False)
    await owner.close()
    shared = await open_store(url(tmp_path), owner=False)
    also_shared = await open_store(url(tmp_path), owner=False)
    with pytest.raises(StoreUnavailable, match="only user unless"):
        await open_store(url(tmp_path), owner=True)
    await shared.close()
    await also_shared.close()
    again = await open_store(url(tmp_path), owner=True)
    await again.close()


async def test_reservations_reach_the_file_and_memory_agrees_with_it(tmp_path: Path) -> None:
    async with owned(tmp_path) as store:
        assert (await store.reserve(reserve_request("r1", 30, B, C, now=NOW))).admitted
        assert (await store.reserve(reserve_request("r2", 40, B, now=NOW))).admitted
        refused = await store.reserve(reserve_request("r3", 40, B, now=NOW))
        assert not refused.admitted and refused.failed == (0,)
        await store.commit("r1", 12, TokenUsage(1, 1), NOW)
        # A read of the file waits for the reservations queued before it.
        states = await store.bucket_states([B, C], NOW)
        assert [(s.spent, s.reserved) for s in states] == [(12, 40), (12, 0)]
        assert [(s.spent, s.reserved) for s in await store.bucket_states([B, C], NOW)] == [
            (store._totals.state(b).spent, store._totals.state(b).reserved) for b in (B, C)
        ]
        assert await store.open_reservations() == 1
    assert await file_state(tmp_path, B, C) == [(12, 40), (12, 0)]
    assert Journal(str(tmp_path / "own.db")).segments() == []


_KILLED_WRITER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from sidecar.store.budget_types import BucketView
    from sidecar.store.sqlite_owned import OwnedSQLiteStore
    from tests.support.reserve import reserve_request

    async def main() -> None:
        store = OwnedSQLiteStore(sys.argv[1])
        await store.open()
        b = BucketView(key="b:own", slot=1_799_996_400, since=1_799_996_400,
                       ttl_seconds=90_000, limit=100)
        for i in range(3):
            assert (await store.reserve(reserve_request(f"k{i}", 20, b,
                                                        now=1_800_000_000.0))).admitted
        # Killed before the reservations' write to the file: only the journal has them.
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


def killed_after_three_reservations(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, url(tmp_path)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


async def test_reservations_of_a_killed_process_are_replayed_from_its_journal(
    tmp_path: Path,
) -> None:
    killed_after_three_reservations(tmp_path)
    journal = Journal(str(tmp_path / "own.db"))
    assert sum(len(Journal.read(s)) for s in journal.segments()) == 3
    with sqlite3.connect(tmp_path / "own.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 0
    async with owned(tmp_path) as store:
        assert Journal(str(tmp_path / "own.db")).segments() == []
        assert store._totals.state(B).reserved == 60
        assert await store.open_reservations() == 3
        # Room is what the three left: 40 fits, 41 does not.
        assert not (await store.reserve(reserve_request("x", 41, B, now=NOW))).admitted
        assert (await store.reserve(reserve_request("y", 40, B, now=NOW))).admitted
        assert (await store.commit("k0", 5, TokenUsage(1, 1), NOW)).status == "committed"
    assert await file_state(tmp_path, B) == [(5, 80)]


async def test_a_journal_replayed_twice_or_torn_at_its_end_changes_nothing_more(
    tmp_path: Path,
) -> None:
    killed_after_three_reservations(tmp_path)
    (segment,) = Journal(str(tmp_path / "own.db")).segments()
    kept = tmp_path / "kept"
    shutil.copy(segment, kept)
    store = OwnedSQLiteStore(url(tmp_path))
    await store.open()
    await store.commit("k1", 7, TokenUsage(1, 1), NOW)
    await store.close()
    # The same records again, and the first bytes of a record the machine did not finish.
    shutil.copy(kept, segment)
    with segment.open("a") as f:
        f.write("k9\t20\t20\t1800000600.0")
    async with owned(tmp_path) as store:
        # k1 stays committed (not reopened), k0 and k2 stay held once, k9 never existed.
        assert (await store.reservation("k1")) is not None
        assert (await store.reservation("k1")).state == "committed"  # type: ignore[union-attr]
        assert await store.reservation("k9") is None
        assert store._totals.state(B).reserved == 40
    assert await file_state(tmp_path, B) == [(7, 40)]


async def test_a_reservation_that_cannot_be_journaled_is_refused_and_holds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with owned(tmp_path) as store:

        def disk_full(record: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(store._journal, "append", disk_full)
        with pytest.raises(StoreUnavailable, match="No space"):
            await store.reserve(reserve_request("r1", 30, B, now=NOW))
        assert store._totals.state(B).reserved == 0
        assert await store.open_reservations() == 0
        monkeypatch.undo()
        assert (await store.reserve(reserve_request("r1", 30, B, now=NOW))).admitted


async def test_a_charge_whose_reservation_failed_to_reach_the_file_is_retried_not_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with owned(tmp_path) as store:
        assert (await store.reserve(reserve_request("r1", 30, B, now=NOW))).admitted
        real_insert = store._insert
        failures = 0

        def failing_once(conn: sqlite3.Connection, pending: object) -> object:
            nonlocal failures
            if failures == 0:
                failures += 1
                raise sqlite3.OperationalError("disk I/O error")
            return real_insert(conn, pending)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "_insert", failing_once)
        # The charge finds no record in the file: it fails (to be retried), never "unknown".
        with pytest.raises(StoreUnavailable):
            await store.commit("r1", 10, TokenUsage(1, 1), NOW)
        assert store._totals.state(B).reserved == 30
        # The write is tried again ahead of the next budget job; the retry then charges.
        assert (await store.commit("r1", 10, TokenUsage(1, 1), NOW)).status == "committed"
        assert failures == 1
        assert (store._totals.state(B).spent, store._totals.state(B).reserved) == (10, 0)
    assert await file_state(tmp_path, B) == [(10, 0)]


async def test_many_concurrent_reservations_and_charges_leave_memory_equal_to_the_file(
    tmp_path: Path,
) -> None:
    big = BucketView(key="b:big", slot=B.slot, since=B.since, ttl_seconds=90_000, limit=5_000)
    async with owned(tmp_path) as store:
        results = await asyncio.gather(
            *(store.reserve(reserve_request(f"c{i}", 30, big, C, now=NOW)) for i in range(300))
        )
        admitted = [f"c{i}" for i, r in enumerate(results) if r.admitted]
        # C's limit (50) admits exactly one 30 µUSD request at a time.
        assert len(admitted) == 1
        more = await asyncio.gather(
            *(store.reserve(reserve_request(f"d{i}", 30, big, now=NOW)) for i in range(300))
        )
        admitted += [f"d{i}" for i, r in enumerate(more) if r.admitted]
        assert len(admitted) == 1 + (5_000 - 30) // 30
        charged = await store.charge_many([(rid, lambda res: None) for rid in admitted[:5]], NOW)
        assert all(getattr(c, "status", None) == "unknown" for c in charged)
        await asyncio.gather(
            *(store.commit(rid, i % 40, TokenUsage(1, 1), NOW) for i, rid in enumerate(admitted))
        )
        memory = [(store._totals.state(b).spent, store._totals.state(b).reserved) for b in (big, C)]
    assert await file_state(tmp_path, big, C) == memory
    assert memory[0] == (sum(i % 40 for i in range(len(admitted))), 0)


async def test_memory_for_expiries_follows_the_open_reservations_not_all_recent_ones(
    tmp_path: Path,
) -> None:
    roomy = BucketView(key="b:roomy", slot=B.slot, since=B.since, ttl_seconds=90_000, limit=10**9)
    async with owned(tmp_path) as store:
        for i in range(5_000):
            assert (await store.reserve(reserve_request(f"m{i}", 1, roomy, now=NOW))).admitted
            await store.commit(f"m{i}", 1, TokenUsage(1, 1), NOW)
        assert await store.open_reservations() == 0
        assert len(store._totals._queued) + len(store._totals._expiries) <= 1024 + 1
        # What stays open is still found when it expires.
        assert (await store.reserve(reserve_request("last", 1, roomy, now=NOW, ttl=5))).admitted
        assert store._totals.first_expiry() == NOW + 5


async def test_holds_stay_in_memory_and_the_file_is_made_current_at_close(
    tmp_path: Path,
) -> None:
    async with owned(tmp_path) as store:
        assert (await store.reserve(reserve_request("h1", 30, B, C, now=NOW))).admitted
        await store.commit("nothing", 0, TokenUsage(), NOW)  # a job: the record is now filed
        with sqlite3.connect(tmp_path / "own.db") as conn:
            assert conn.execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 1
            assert conn.execute("SELECT COUNT(*) FROM reserved").fetchone()[0] == 0
            assert conn.execute("SELECT value FROM meta WHERE key='holds'").fetchone() == (
                "memory",
            )
        states = await store.bucket_states([B, C], NOW)
        assert [(s.spent, s.reserved) for s in states] == [(0, 30), (0, 30)]
    with sqlite3.connect(tmp_path / "own.db") as conn:
        assert conn.execute("SELECT * FROM meta").fetchall() == []
        assert sorted(conn.execute("SELECT bucket, amount FROM reserved")) == [
            ("b:other", 30),
            ("b:own", 30),
        ]


@pytest.mark.parametrize("opener", ["shared", "plain"])
async def test_after_a_killed_owner_any_next_process_replays_its_journal_and_holds(
    tmp_path: Path, opener: str
) -> None:
    killed_after_three_reservations(tmp_path)
    store = await open_store(url(tmp_path), owner=False if opener == "shared" else None)
    try:
        assert Journal(str(tmp_path / "own.db")).segments() == []
        assert [(s.spent, s.reserved) for s in await store.bucket_states([B], NOW)] == [(0, 60)]
        assert await store.open_reservations() == 3
        # The file's own reservations see the replayed holds: 40 fits, 41 does not.
        assert not (await store.reserve(reserve_request("x", 41, B, now=NOW))).admitted
        assert (await store.reserve(reserve_request("y", 40, B, now=NOW))).admitted
    finally:
        await store.close()


async def test_an_id_the_file_already_has_lets_go_of_its_holds_once_written(
    tmp_path: Path,
) -> None:
    # Memory remembers recently ended ids only; an id ended before this process started is
    # found when its record is written, and what it held in memory is let go.
    store = OwnedSQLiteStore(url(tmp_path))
    await store.open()
    assert (await store.reserve(reserve_request("old", 30, B, now=NOW))).admitted
    await store.commit("old", 10, TokenUsage(1, 1), NOW)
    await store.close()
    async with owned(tmp_path) as store:
        assert (await store.reserve(reserve_request("old", 30, B, now=NOW))).admitted
        assert store._totals.state(B).reserved == 30
        # Any read of the file waits for the write, whose callback runs before it returns.
        found = await store.reservation("old")
        assert found is not None and found.state == "committed"
        assert (store._totals.state(B).spent, store._totals.state(B).reserved) == (10, 0)
        assert await store.open_reservations() == 0
    assert await file_state(tmp_path, B) == [(10, 0)]


async def test_reservations_are_refused_once_too_many_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roomy = BucketView(key="b:roomy", slot=B.slot, since=B.since, ttl_seconds=90_000, limit=10**9)
    monkeypatch.setattr("sidecar.store.sqlite_owned._MAX_UNWRITTEN", 3)
    async with owned(tmp_path) as store:

        def broken(conn: sqlite3.Connection, pending: object) -> object:
            raise sqlite3.OperationalError("disk I/O error")

        working = store._insert
        monkeypatch.setattr(store, "_insert", broken)
        for i in range(3):
            assert (await store.reserve(reserve_request(f"u{i}", 1, roomy, now=NOW))).admitted
        with pytest.raises(StoreUnavailable):
            await store.commit("u0", 1, TokenUsage(1, 1), NOW)  # its write failed: retried
        with pytest.raises(StoreUnavailable, match="not written"):
            await store.reserve(reserve_request("u3", 1, roomy, now=NOW))
        assert store._totals.state(roomy).reserved == 3
        monkeypatch.setattr(store, "_insert", working)
        # Written again ahead of the next job; then there is room for more (the bound is
        # still 3).
        assert (await store.commit("u0", 1, TokenUsage(1, 1), NOW)).status == "committed"
        assert (await store.reserve(reserve_request("u3", 1, roomy, now=NOW))).admitted


async def test_buckets_let_go_of_are_read_back_with_every_charge_made_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Memory keeps no bucket without a hold past a housekeeping pass: every decision reads
    # its buckets from the file again.
    monkeypatch.setattr("sidecar.store.sqlite_owned._BUCKETS_KEPT", 0)
    async with owned(tmp_path) as store:
        assert (await store.reserve(reserve_request("e1", 40, B, now=NOW))).admitted
        await store.commit("e1", 30, TokenUsage(1, 1), NOW)
        await store.settle_expired(NOW)
        assert store._totals.missing([B]) == [B.key]
        # Read back: 30 spent, so 70 fits and 71 does not.
        assert not (await store.reserve(reserve_request("e2", 71, B, now=NOW))).admitted
        assert (await store.reserve(reserve_request("e3", 70, B, now=NOW))).admitted
        await store.commit("e3", 20, TokenUsage(1, 1), NOW)
        await store.settle_expired(NOW)
        assert store._totals.missing([B]) == [B.key]
        states = await store.bucket_states([B], NOW)
        assert (states[0].spent, states[0].reserved, states[0].slots) == (50, 0, {B.slot: 50})
    assert await file_state(tmp_path, B) == [(50, 0)]


async def test_decisions_charges_and_evictions_interleaved_admit_exactly_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sidecar.store.sqlite_owned._BUCKETS_KEPT", 0)
    tight = BucketView(key="b:tight", slot=B.slot, since=B.since, ttl_seconds=90_000, limit=600)
    store = OwnedSQLiteStore(url(tmp_path))
    await store.open()
    admitted: list[str] = []

    async def one(i: int) -> None:
        if (await store.reserve(reserve_request(f"t{i}", 10, tight, now=NOW))).admitted:
            admitted.append(f"t{i}")
            # Charged the full estimate: the room only ever shrinks.
            await store.commit(f"t{i}", 10, TokenUsage(1, 1), NOW)

    async def sweep() -> None:
        for _ in range(40):
            await store.settle_expired(NOW)

    try:
        await asyncio.gather(sweep(), *(one(i) for i in range(200)))
        memory = store._totals.state(tight) if not store._totals.missing([tight]) else None
        states = await store.bucket_states([tight], NOW)
    finally:
        await store.close()
    assert len(admitted) == 60
    assert (states[0].spent, states[0].reserved) == (600, 0)
    assert memory is None or (memory.spent, memory.reserved) == (600, 0)
    assert await file_state(tmp_path, tight) == [(600, 0)]


async def test_a_charge_to_one_bucket_read_empty_leaves_the_others_empty(tmp_path: Path) -> None:
    # Buckets read with no slots have no slots entry until their first charge.
    async with owned(tmp_path) as store:
        assert (await store.reserve(reserve_request("s1", 10, B, C, now=NOW))).admitted
        await store.commit("s1", 7, TokenUsage(1, 1), NOW)
        assert (await store.reserve(reserve_request("s2", 10, B, now=NOW))).admitted
        other = BucketView(key="b:third", slot=B.slot, since=B.since, ttl_seconds=9, limit=5)
        assert (await store.reserve(reserve_request("s3", 1, other, now=NOW))).admitted
        assert [s.spent for s in await store.bucket_states([B, C, other], NOW)] == [7, 7, 0]
        assert set(store._totals._slots) == {B.ref, C.ref}
        assert other.ref in store._totals.buckets


async def test_holds_open_at_start_count_before_and_after_their_bucket_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sidecar.store.sqlite_owned._BUCKETS_KEPT", 0)
    async with owned(tmp_path) as store:
        assert (await store.reserve(reserve_request("h1", 60, B, now=NOW))).admitted
    async with owned(tmp_path) as store:
        # Loaded with the open reservations, before any decision has read the bucket.
        assert store._totals.missing([B]) == [B.key]
        assert store._totals.state(B).reserved == 60
        assert not (await store.reserve(reserve_request("h2", 41, B, now=NOW))).admitted
        assert (await store.reserve(reserve_request("h3", 40, B, now=NOW))).admitted
        # A bucket that holds something stays in memory past housekeeping.
        await store.settle_expired(NOW)
        assert store._totals.missing([B]) == []
        await store.commit("h1", 10, TokenUsage(1, 1), NOW)
        await store.commit("h3", 5, TokenUsage(1, 1), NOW)
        assert (store._totals.state(B).spent, store._totals.state(B).reserved) == (15, 0)
        # Holding nothing now, it is let go of and read back with its spend.
        await store.settle_expired(NOW)
        assert store._totals.missing([B]) == [B.key]
        assert not (await store.reserve(reserve_request("h4", 86, B, now=NOW))).admitted
        assert (await store.reserve(reserve_request("h5", 85, B, now=NOW))).admitted
    assert await file_state(tmp_path, B) == [(15, 85)]


def test_ended_ids_are_refused_until_the_most_recent_ones_push_them_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sidecar.store.sqlite_totals._ENDED_KEPT", 3)
    totals = Totals()
    for rid in ("a", "b", "c", "d"):
        totals.opened(rid, NOW + 60)
        totals.ended(rid)
    totals.ended("c")  # ending again neither forgets nor refreshes it
    assert [totals.existing(rid, "bind", NOW, None) for rid in "abcd"] == [
        None,
        False,
        False,
        False,
    ]
    totals.opened("e", NOW + 60)
    totals.ended("e")
    assert [totals.existing(rid, "bind", NOW, None) for rid in "bcde"] == [
        None,
        False,
        False,
        False,
    ]


async def test_a_repeated_open_id_is_judged_by_the_binding_in_its_record_or_the_file(
    tmp_path: Path,
) -> None:
    # Memory keeps no binding: a repeated id reads it from the record waiting to be written,
    # from the file once written, and from the file after the file is opened again.
    mine = replace(reserve_request("d1", 40, B, now=NOW), binding="alice|40")
    theirs = replace(reserve_request("d1", 40, B, now=NOW), binding="mallory|40")

    async def judged(store: OwnedSQLiteStore) -> tuple[bool, bool]:
        other = await store.reserve(theirs)
        same = await store.reserve(mine)
        assert not other.admitted and store._totals.state(B).reserved == 40
        return other.conflict, same.duplicate

    async with owned(tmp_path) as store:
        assert (await store.reserve(mine)).admitted
        assert [r[0] for r, _ in store._pending] == ["d1"]
        assert await judged(store) == (True, True)
        await store.reservation("d1")  # written to the file
        assert store._pending == []
        assert await judged(store) == (True, True)
    async with owned(tmp_path) as store:
        assert store._totals.open_entry("d1") is not None
        assert await judged(store) == (True, True)
