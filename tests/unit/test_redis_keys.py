"""Budget key names: one owner's buckets share one group key, in their own hash slot, and
the counters key of the layout before groups is the group's key, ":", the bucket key (the
rule the scripts follow to find it)."""

from __future__ import annotations

from redis.crc import key_slot

from sidecar.store.redis_keys import redis_key

DAILY = "daily|fixed:daily|user=alice@example.com"
HOURLY = "hourly|rolling:1h|user=alice@example.com|model=gpt-4o"


def test_one_owners_buckets_share_a_group_in_their_hash_slot() -> None:
    group = redis_key("p:", "group", DAILY)
    assert group == "p:c:{o:user=alice@example.com}"
    assert redis_key("p:", "group", HOURLY) == group
    assert redis_key("p:", "group", "daily|fixed:daily|user=bob") != group
    for bucket in (DAILY, HOURLY):
        assert key_slot(group.encode()) == key_slot(redis_key("p:", "bucket", bucket).encode())


def test_the_counters_key_before_groups_is_the_group_key_and_the_bucket() -> None:
    for bucket in (DAILY, HOURLY, "org-monitor|fixed:daily"):
        counters = redis_key("p:", "counters", bucket)
        assert counters == f"{redis_key('p:', 'group', bucket)}:{bucket}"
        # As the layout before named it: "c:" where the bucket's hash key has "b:".
        assert counters == redis_key("p:", "bucket", bucket).replace("p:b:", "p:c:", 1)
