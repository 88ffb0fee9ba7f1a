"""A reservation's record as the Redis store packs it, read back by the store: the packed
layout and the JSON arrays written before it give the same fields."""

from __future__ import annotations

import json

import pytest

from sidecar.store import redis_record
from sidecar.store.redis_record import Head

HEAD = Head(
    estimate=2**53 - 1,
    expires_at=1_800_000_600.25,
    home=True,
    hour=1_799_996_400,
    tokens=(120, 4_000),
    created=1_800_000_000.5,
    binding="caller|gpt-4o",
    dims='["alice@example.com", ["é"], "", "user", "gpt-4o", "openai"]',
    ledger_index="p:{n0}:li:1799996400",
    groups="n1,n2",
    request_id="r-1",
)


def entry() -> bytes:
    return redis_record.bucket(
        redis_record.text("p:c:{o:user=alice}:daily|user=alice"),
        redis_record.NO_TEXT,
        redis_record.text("usd"),
        (1_799_971_200, 1_799_971_200, 90_000),
        500,
        500,
        None,
    )


def test_a_packed_record_gives_back_its_fields_and_starts_with_its_state() -> None:
    raw = redis_record.record(HEAD, [entry(), entry()])
    assert raw[:1] == b"o"
    assert redis_record.fields(raw) == ("o", 2**53 - 1, HEAD.dims, 120, 4_000, True)
    other = redis_record.record(HEAD._replace(home=False, dims=""), [])
    assert redis_record.fields(b"c" + other[1:]) == ("c", 2**53 - 1, "", 120, 4_000, False)


def test_a_json_record_of_the_earlier_layout_gives_the_same_fields() -> None:
    head = ["x", 700, 1.5, "b", 0, "", "", 0, 3, 4, "", "r", 1.0]
    raw = json.dumps([*head, "p:c:{o:x}:k", 0, 60, "usd", 700, 700, 0]).encode()
    assert redis_record.fields(raw) == ("x", 700, "", 3, 4, False)


def test_a_record_names_at_most_the_buckets_its_count_can_say() -> None:
    with pytest.raises(ValueError, match="at most 32767"):
        redis_record.record(HEAD, [b""] * (redis_record.MAX_BUCKETS + 1))
