"""The budget scripts as one Redis Functions library, called with FCALL, loaded where missing.

Run as scripts, every call ran budget_lib.lua's definitions again (a closure per helper,
before any work): that was as much Redis CPU as a whole FCALL. A library is loaded once and
its functions called directly. Its name and its functions' names carry a hash of its source,
so replicas of different versions never call each other's code, and loading it again is
harmless.

A server may lack the library: a new one, one restarted without persistence, a node that
joined the cluster. FCALL then answers "Function not found", and the library is loaded on
that very node (the one owning the call's key) and the call repeated. Like `LuaScript`'s
EVAL fallback, this never needs any other node: with a shard down, the others go on. A
replica promoted by a failover already has the library (FUNCTION LOAD is replicated).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, cast

from redis._parsers import AsyncCommandsParser
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# The scripts that become functions, each with budget_lib.lua's helpers.
BUDGET_SCRIPTS = (
    "reserve",
    "commit",
    "commit_many",
    "release",
    "settle",
    "settle_part",
    "add_spend",
)


class _Caller(Protocol):
    def fcall(self, function: str, numkeys: int, *keys_and_args: Any) -> Any: ...


class Library:
    """budget_lib.lua and the scripts, as the source of one library."""

    def __init__(self, lib: str, scripts: dict[str, str], cluster: bool) -> None:
        digest = hashlib.sha1(usedforsecurity=False)
        for text in (lib, *scripts.values(), str(cluster)):
            digest.update(text.encode("utf-8"))
        self.name = f"sidecar_budget_{digest.hexdigest()[:16]}"
        # A script touches every key of its shard (buckets of many hash slots): on a cluster
        # Redis 7 allows that to functions flagged allow-cross-slot-keys.
        flags = "{'allow-cross-slot-keys'}" if cluster else "{}"
        parts = [f"#!lua name={self.name}", lib]
        for name, body in scripts.items():
            # Each call begins with budget_lib.lua's `begin` (the library's locals are
            # shared by every call).
            parts.append(
                f"redis.register_function{{function_name='{self.function(name)}', "
                f"flags={flags}, callback=function(KEYS, ARGV)\n"
                f"begin()\n{body}\nend}}"
            )
        self.source = "\n".join(parts)

    def function(self, script: str) -> str:
        return f"{self.name}_{script}"


Loader = Callable[[str, str], Awaitable[object]]  # (library source, a key on the node) -> _


class LuaFunction:
    """One function of `library`: `await fn(keys, args)` runs FCALL, loading the library
    with `load` on the node of `keys[0]` when that node lacks it."""

    def __init__(self, client: _Caller, library: Library, script: str, load: Loader) -> None:
        self._client = client
        self._library = library
        self._load = load
        self.name = library.function(script)

    async def __call__(self, keys: Sequence[str], args: Sequence[str | int | bytes] = ()) -> Any:
        try:
            return await cast(
                Awaitable[Any], self._client.fcall(self.name, len(keys), *keys, *args)
            )
        except ResponseError as exc:
            if "Function not found" not in str(exc):
                raise
        await self._load(self._library.source, keys[0])
        return await cast(Awaitable[Any], self._client.fcall(self.name, len(keys), *keys, *args))


class FunctionCluster(RedisCluster):
    """The cluster client, routing FCALL by its first key.

    redis-py finds the keys of FCALL (a command with "movable" keys) by asking a node
    (COMMAND GETKEYS): a round trip before every call. Its numkeys says where they are, as
    for EVALSHA, which redis-py reads itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands_parser = _CommandTable(self)

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if command.upper() == "FCALL" and len(args) > 2 and int(args[1]) > 0:
            return self.keyslot(args[2])
        return await super()._determine_slot(command, *args)

    async def aclose(self) -> None:
        """Let go of connections after a node failed, without failing the other nodes' work.

        redis-py's cluster pipeline calls this on a connection error before it retries, and
        the client-wide close it would do cuts the connections of commands in flight on the
        healthy shards: with one primary down, a read on another failed now and then. As
        redis-py does for a single command's failure, connections in use are closed once
        their command ends, idle ones now, and the slot layout is learnt again before the
        next command (from any node that answers: see `_CommandTable`). `close_for_good` closes
        for good."""
        for node in list(self.nodes_manager.nodes_cache.values()):
            node.update_active_connections_for_reconnect()
            await node.disconnect_free_connections()
        self._initialize = True

    async def close_for_good(self) -> None:
        await super().aclose()

    async def load_library(self, source: str, key: str) -> None:
        """Load `source` on the primary serving `key` only (FUNCTION LOAD would otherwise go
        to every primary, and fail while one is down)."""
        node = self.get_node_from_key(key)
        await self.execute_command("FUNCTION LOAD", "REPLACE", source, target_nodes=node)


class _CommandTable(AsyncCommandsParser):
    """The server's command table, asked for once, of any node that answers.

    redis-py asks its default node for it each time it learns the slot layout, and that
    node may be a primary that is down: a client started while it was down then served no
    shard at all, and one that lost it closed every node's connections under the commands
    in flight each time it learnt the layout again. The table does not change when a
    primary does, and any node can give it."""

    def __init__(self, cluster: RedisCluster) -> None:
        super().__init__()
        self._cluster = cluster

    async def initialize(self, node: ClusterNode | None = None) -> None:
        if node is not None:
            self.node = node
        if self.commands:
            return
        known = self._cluster.nodes_manager.nodes_cache.values()
        candidates = ([node] if node is not None else []) + [n for n in known if n is not node]
        error: Exception = RedisClusterException("no node known to ask for the command table")
        for candidate in candidates:
            try:
                await super().initialize(candidate)  # the node that answers is kept
                return
            except (RedisConnectionError, RedisTimeoutError) as exc:
                error = exc
        raise error
