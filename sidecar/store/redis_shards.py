"""Which shard a Redis key lives on, named by the shard's node tag.

Budget state is split by shard: a request's buckets are grouped by the shard that owns
them, and each group's record, the shard's expiry indexes and its ledger live under a hash
tag `{T}` whose slot that shard owns, so one script per shard touches only its own keys. On
one Redis there is one shard and its tag is `n0`.

A node tag is `n<i>` for the smallest i whose hash slot the shard serves. When the cluster's
layout changes (a failover keeps slots where they were; resharding moves them), a tag may end
up on another shard, with its keys: data is never lost, the store picks the new smallest tag
for each shard, and the registry of tags ever used (`redis_keys` kind "tags") lets the
expiry sweep and ledger reads visit the old ones too.
"""

from __future__ import annotations

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

SINGLE_TAG = "n0"
# Enough candidates that every shard of any real cluster owns one: 16,384 slots over even
# a hundred shards leave each with ~160 slots, and 20,000 tags cover them all.
_CANDIDATES = 20_000


class Shards:
    """Maps keys to node tags, from the cluster client's current slot table (one Redis:
    always `n0`)."""

    def __init__(self, cluster: RedisCluster | None) -> None:
        self._cluster = cluster
        self._tags: dict[str, str] = {}  # node name -> its tag

    @property
    def single(self) -> bool:
        return self._cluster is None

    def node_of_slot(self, slot: int) -> str:
        assert self._cluster is not None
        # SlotNotCoveredError (a RedisClusterException) when no shard serves it: the store
        # turns that into StoreUnavailable for the keys concerned.
        return str(self._cluster.nodes_manager.get_node_from_slot(slot).name)

    def tag_of(self, key: str) -> str:
        """The node tag of the shard holding `key`."""
        if self._cluster is None:
            return SINGLE_TAG
        return self.tag_of_node(self.node_of_slot(self._cluster.keyslot(key)))

    def tag_of_node(self, node: str) -> str:
        tag = self._tags.get(node)
        if tag is not None and self.node_of_slot(key_slot(tag.encode())) == node:
            return tag
        self._tags = self._scan()
        if node not in self._tags:
            raise LookupError(f"no node tag found for shard {node}")
        return self._tags[node]

    def current_tags(self) -> list[str]:
        """The tag of every shard in the current layout."""
        if self._cluster is None:
            return [SINGLE_TAG]
        if not self._tags:
            self._tags = self._scan()
        return sorted(set(self._tags.values()))

    def _scan(self) -> dict[str, str]:
        assert self._cluster is not None
        cache = self._cluster.nodes_manager.slots_cache
        primaries = {nodes[0].name for nodes in cache.values() if nodes}
        found: dict[str, str] = {}
        for i in range(_CANDIDATES):
            tag = f"n{i}"
            nodes = cache.get(key_slot(tag.encode()))
            if nodes and nodes[0].name not in found:
                found[nodes[0].name] = tag
                if len(found) == len(primaries):
                    break
        return found
