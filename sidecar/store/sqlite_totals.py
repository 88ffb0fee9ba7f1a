"""Budget state in the memory of the one process that owns a SQLite file.

Loaded whole from the file when it is opened and kept equal to it afterwards: a reservation
changes memory first (and reaches the file through the journal), every other budget change
is made in the file and its effect applied here once committed (`Deltas`). With no other
writer, memory is then the file's state plus the reservations on their way to it, so a
decision reads a dozen buckets from dicts instead of a SQL statement on another thread.
"""

from __future__ import annotations

import heapq
import itertools
import sqlite3
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from sidecar.store.budget_types import BucketState, BucketView, bucket_ref
from sidecar.store.sqlite_records import holds_of

# Ended reservation ids remembered, so that a reserve repeating one is refused as the file
# would refuse it. Ids are minted per admission with 122 random bits, so a repeat is a bug
# or an attack on the store API, and recent ones are all such a repeat can name.
_ENDED_KEPT = 65_536
# Bucket keys per statement when reading slots (under SQLite's 999 bound parameters).
_KEYS_PER_READ = 500
# Stale entries the expiry heap may hold beyond twice the open reservations.
_EXPIRIES_SLACK = 1024

# Slots read from the file: bucket -> [(slot, amount, expiry)]
SlotsRead = dict[str, list[tuple[int, int, int]]]


@dataclass(slots=True)
class Deltas:
    """What one transaction changed in the buckets, to apply to memory once committed."""

    # (bucket, slot, amount, slot expiry)
    spent: list[tuple[str, int, int, int]] = field(default_factory=list)
    # (bucket, amount)
    held: list[tuple[str, int]] = field(default_factory=list)
    # Reservations that stopped being open.
    ended: list[str] = field(default_factory=list)

    def extend(self, other: Deltas) -> None:
        self.spent += other.spent
        self.held += other.held
        self.ended += other.ended


# An open reservation's entry: its expires_at, the very float object it was opened with
# (an id opened again has another, so an entry read earlier can be told from the current
# one by identity). Its binding is not kept: only a repeated id needs it, and reads it from
# the file (`existing`). Every reservation of the last TTL may be open, so each costs only
# its id, this float and a slot in a dict and two deques (a tuple per reservation for an
# expiry heap was about 70 bytes more).
Open = float


class Totals:
    """Buckets are known by `bucket_ref` of their key (a view carries it): every bucket
    with a hold stays in memory, one per caller and rule of every call in flight, and its
    key string was most of what each cost."""

    def __init__(self) -> None:
        # bucket -> what open reservations hold (0: nothing), for the buckets read from the
        # file since they were last evicted (`missing` names the others; a decision reads
        # them first). One dict both says a bucket is in memory and holds its hold: most
        # buckets read have no slots, and a second dict entry each was 25 bytes a bucket.
        self.buckets: dict[int, int] = {}
        # bucket -> slot -> [amount, expiry], for the buckets in `buckets` that have slots
        self._slots: dict[int, dict[int, list[int]]] = {}
        # bucket -> hold, of buckets not in memory: the holds of the reservations open when
        # the file was opened, until a decision reads their bucket (held buckets are never
        # evicted, so nothing else lands here).
        self._unread_held: dict[int, int] = {}
        # (expiry, bucket, slot) of every slot, to forget them as the file's housekeeping
        # deletes them without looking at every bucket; an entry may be older than its
        # slot's expiry (extended since), and is then put back.
        self._slot_expiries: list[tuple[int, int, int]] = []
        self.open_entries: dict[str, Open] = {}
        # Expiries in the order they come up: reservations are opened with the same TTL
        # nearly always, so in admission order (two deques: ids, and their entries); one
        # that would come up before the last queued (a shorter TTL after a reload) goes to
        # a heap instead. Entries no longer current are skipped when they come up.
        self._queued_ids: deque[str] = deque()
        self._queued: deque[Open] = deque()
        self._expiries: list[tuple[float, str]] = []
        # The ids, and the order to forget them in: a set and a deque take about half the
        # memory of an OrderedDict (whose links cost some 50 bytes an id).
        self._ended: set[str] = set()
        self._ended_order: deque[str] = deque()

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> Totals:
        """The open reservations and their holds; buckets' slots are read when a decision
        first needs them (`read_slots`)."""
        totals = cls()
        # The holds are what the open reservations hold (the `reserved` table is not kept
        # current while a process owns the file).
        for rid, expires_at, buckets_json, estimate, held in conn.execute(
            "SELECT request_id, expires_at, buckets, estimate, held FROM reservations "
            "WHERE state = 'open' ORDER BY expires_at"
        ):
            totals.opened(rid, expires_at)
            for key, hold in holds_of(buckets_json, estimate, held):
                totals.hold(bucket_ref(key), hold)
        return totals

    @staticmethod
    def read_slots(conn: sqlite3.Connection, keys: Sequence[str]) -> SlotsRead:
        """Every slot of `keys` in the file, expired or not (which still count is decided
        per decision by the bucket's window, as the file's own statement does)."""
        out: SlotsRead = {key: [] for key in keys}
        for start in range(0, len(keys), _KEYS_PER_READ):
            chunk = keys[start : start + _KEYS_PER_READ]
            for key, slot, amount, expires in conn.execute(
                "SELECT bucket, slot, amount, expires_at FROM slots WHERE bucket IN ("
                + ",".join("?" * len(chunk))
                + ")",
                chunk,
            ):
                out[key].append((slot, amount, expires))
        return out

    def missing(self, buckets: Sequence[BucketView]) -> list[str]:
        """The buckets' keys whose slots are not in memory (never read, or evicted)."""
        known = self.buckets
        return list(dict.fromkeys(b.key for b in buckets if b.ref not in known))

    def loaded(self, read: SlotsRead) -> None:
        """Slots read from the file, for the keys still missing. A key read meanwhile by
        another decision keeps what it has: that, with the changes applied since, is
        newer than this read."""
        known = self.buckets
        for name, rows in read.items():
            key = bucket_ref(name)
            if key in known:
                continue
            known[key] = self._unread_held.pop(key, 0) if self._unread_held else 0
            if not rows:
                continue  # most buckets read have no spend yet: no slots entry
            cells = self._slots[key] = {}
            for slot, amount, expires in rows:
                cells[slot] = [amount, expires]
                heapq.heappush(self._slot_expiries, (expires, key, slot))

    def evict(self, keep: int) -> int:
        """Forget the slots of the oldest-read buckets that hold nothing, down to `keep`
        buckets (the file has every charged slot; only holds live in memory alone)."""
        known = self.buckets
        excess = len(known) - keep
        if excess <= 0:
            return 0
        gone = [key for key in itertools.islice(known, 2 * excess) if not known[key]]
        for key in gone[:excess]:
            del known[key]
            self._slots.pop(key, None)
        heap = self._slot_expiries
        if (
            len(heap) > 2 * len(self._slots) + _EXPIRIES_SLACK
            and len(heap) > 2 * sum(map(len, self._slots.values())) + _EXPIRIES_SLACK
        ):
            # A let-go bucket's slots leave their expiries in the heap until they come up
            # (a month, for a monthly window): rebuilt from the slots kept, it stays within
            # twice them.
            self._slot_expiries = [
                (cell[1], key, slot)
                for key, slots in self._slots.items()
                for slot, cell in slots.items()
            ]
            heapq.heapify(self._slot_expiries)
        return min(len(gone), excess)

    # -- reading ---------------------------------------------------------------------
    def state(self, bucket: BucketView, with_slots: bool = False) -> BucketState:
        """`with_slots`: also the amount of each slot in the window, by slot."""
        slots = self._slots.get(bucket.ref)
        spent = 0
        kept: dict[int, int] = {}
        if slots:
            since = bucket.since
            for slot, cell in slots.items():
                if slot >= since:
                    spent += cell[0]
                    if with_slots:
                        kept[slot] = cell[0]
        return BucketState(spent, self._held(bucket.ref), kept)

    def _held(self, key: int) -> int:
        held = self.buckets.get(key)
        return self._unread_held.get(key, 0) if held is None else held

    def read(self, buckets: Sequence[BucketView]) -> tuple[list[int], list[int]]:
        """Spent and held of each bucket: `state` for a whole decision, in one loop (it
        is most of a reservation's work)."""
        slots_of = self._slots
        held_of = self.buckets
        spent_list: list[int] = []
        held_list: list[int] = []
        for b in buckets:
            key = b.ref
            spent = 0
            slots = slots_of.get(key)
            if slots:
                since = b.since
                for slot, cell in slots.items():
                    if slot >= since:
                        spent += cell[0]
            spent_list.append(spent)
            try:
                held_list.append(held_of[key])
            except KeyError:  # not read in (a decision reads its buckets in first)
                held_list.append(self._unread_held.get(key, 0))
        return spent_list, held_list

    def open_count(self) -> int:
        return len(self.open_entries)

    def first_expiry(self) -> float | None:
        """When the earliest open reservation expires (None: none is open)."""
        entries = self.open_entries
        ids, queued = self._queued_ids, self._queued
        # An entry is current while it is the one its id maps to.
        while ids and entries.get(ids[0]) is not queued[0]:
            ids.popleft()
            queued.popleft()
        heap = self._expiries
        if not heap:  # nearly always
            return queued[0] if queued else None
        while heap and entries.get(heap[0][1]) is not heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            return queued[0] if queued else None
        return min(queued[0], heap[0][0]) if queued else heap[0][0]

    def open_entry(self, request_id: str) -> Open | None:
        return self.open_entries.get(request_id)

    def existing(
        self, request_id: str, binding: str, now: float, stored: tuple[Open, str] | None
    ) -> bool | None:
        """Whether `request_id` is this same admission still open (True), taken by
        another or ended (False), or unknown here (None). `stored`: the id's open entry
        and the binding it was admitted with (None: not found), as the caller read them
        when the id was open; an entry that is not this one's current is no pass."""
        found = self.open_entries.get(request_id)
        if found is not None:
            return (
                found > now and stored is not None and stored[0] is found and stored[1] == binding
            )
        return False if request_id in self._ended else None

    # -- changing --------------------------------------------------------------------
    def hold(self, key: int, amount: int) -> None:
        """`amount` more held in the bucket `key` (its `bucket_ref`)."""
        held = self.buckets.get(key)
        if held is not None:
            # The first hold shares the caller's int (often one for all a request's buckets).
            self.buckets[key] = held + amount if held else amount
            return
        total = self._unread_held.get(key, 0) + amount
        if total:
            self._unread_held[key] = total
        else:
            self._unread_held.pop(key, None)

    def add(self, key: int, slot: int, amount: int, expires: int) -> None:
        slots = self._slots.get(key)
        if slots is None:
            if key not in self.buckets:
                return  # not in memory: the file, where this change was made, is read first
            slots = self._slots[key] = {}
        cell = slots.get(slot)
        if cell is None:
            slots[slot] = [amount, expires]
            heapq.heappush(self._slot_expiries, (expires, key, slot))
        else:
            cell[0] += amount
            cell[1] = max(cell[1], expires)

    def opened(self, request_id: str, expires_at: float) -> None:
        # A float object of its own: entries are told apart by identity (`Open`).
        entry = self.open_entries[request_id] = expires_at + 0.0
        queued = self._queued
        if not queued or queued[-1] <= entry:
            self._queued_ids.append(request_id)
            queued.append(entry)
        else:
            heapq.heappush(self._expiries, (entry, request_id))

    def ended(self, request_id: str) -> None:
        if self.open_entries.pop(request_id, None) is None and request_id in self._ended:
            return
        entries = self.open_entries
        if len(self._queued) + len(self._expiries) > 2 * len(entries) + _EXPIRIES_SLACK:
            # Ended reservations leave their expiry queued until it comes up; most end long
            # before (charged), so without this the queue would hold every reservation of
            # the last TTL. Kept to what is open (in the same order), it stays within twice
            # that.
            kept = [
                (rid, entry)
                for rid, entry in zip(self._queued_ids, self._queued, strict=True)
                if entries.get(rid) is entry
            ]
            self._queued_ids = deque(rid for rid, _ in kept)
            self._queued = deque(entry for _, entry in kept)
            self._expiries = [e for e in self._expiries if entries.get(e[1]) is e[0]]
            heapq.heapify(self._expiries)
        if request_id in self._ended:
            return
        self._ended.add(request_id)
        self._ended_order.append(request_id)
        if len(self._ended_order) > _ENDED_KEPT:
            self._ended.discard(self._ended_order.popleft())

    def is_open(self, request_id: str) -> bool:
        return request_id in self.open_entries

    def apply(self, deltas: Deltas) -> None:
        for name, slot, amount, expires in deltas.spent:
            self.add(bucket_ref(name), slot, amount, expires)
        for name, amount in deltas.held:
            self.hold(bucket_ref(name), amount)
        for request_id in deltas.ended:
            self.ended(request_id)

    def prune(self, now: float) -> None:
        """Forget the slots the file's housekeeping deletes: those past their expiry."""
        cutoff = int(now)
        heap = self._slot_expiries
        while heap and heap[0][0] < cutoff:
            _, key, slot = heapq.heappop(heap)
            slots = self._slots.get(key)
            cell = slots.get(slot) if slots else None
            if slots is None or cell is None:
                continue
            if cell[1] < cutoff:
                del slots[slot]
                if not slots:
                    # The bucket stays in memory, with no slots (as in the file now).
                    del self._slots[key]
            else:
                heapq.heappush(heap, (cell[1], key, slot))
