"""Pick and open a store backend from its URL."""

from __future__ import annotations

from sidecar.store.base import Store


async def open_store(url: str) -> Store:
    store: Store
    if url.startswith("sqlite:///"):
        from sidecar.store.sqlite_store import SQLiteStore

        store = SQLiteStore(url)
    elif url.startswith(("redis://", "rediss://")):
        from sidecar.store.redis_store import RedisStore

        store = RedisStore(url)
    else:
        raise ValueError(f"unsupported store URL scheme: {url.split(':', 1)[0]!r}")
    await store.open()
    return store
