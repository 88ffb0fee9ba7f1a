"""A reservation record's buckets, as the SQLite store keeps them in `reservations.buckets`."""

from __future__ import annotations

import json

# One bucket of a reservation record: key, slot, slot expiry, measure, the estimate in that
# measure, and what is held of it (the estimate, or 0 under optimistic admission).
Entry = tuple[str, int, int, str, int, int]


def entries(buckets_json: str, estimate: int, held: int) -> list[Entry]:
    """The buckets of a reservation record. Records written before buckets had measures
    list only key, slot and expiry: those were µUSD buckets holding `held` of `estimate`."""
    out: list[Entry] = []
    for entry in json.loads(buckets_json):
        if len(entry) == 3:
            out.append((entry[0], entry[1], entry[2], "usd", estimate, held))
        else:
            key, slot, expires, measure, amount, hold = entry
            out.append((key, slot, expires, measure, amount, hold))
    return out


def holds_of(buckets_json: str, estimate: int, held: int) -> list[tuple[str, int]]:
    """What a reservation record holds, per bucket."""
    return [(e[0], e[5]) for e in entries(buckets_json, estimate, held) if e[5]]
