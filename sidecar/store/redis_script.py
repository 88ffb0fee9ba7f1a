"""A Lua script run by its SHA1, falling back to its source on the node that lacks it.

redis-py's own Script reloads a forgotten script with SCRIPT LOAD, which a cluster client
sends to every node: with one node down, no script could be reloaded anywhere, and the
shards that are up would fail too. EVAL goes to the node owning the keys (which caches the
script from then on), so a script only ever needs the shard it runs on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, cast

from redis.exceptions import NoScriptError


class _Evaluator(Protocol):
    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any: ...


class LuaScript:
    def __init__(self, client: _Evaluator, source: str) -> None:
        self._client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: Sequence[str], args: Sequence[str | int | bytes] = ()) -> Any:
        try:
            return await cast(
                Awaitable[Any], self._client.evalsha(self.sha, len(keys), *keys, *args)
            )
        except NoScriptError:
            return await cast(
                Awaitable[Any], self._client.eval(self.source, len(keys), *keys, *args)
            )
