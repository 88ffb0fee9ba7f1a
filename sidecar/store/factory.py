"""Pick and open a store backend from its URL."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from sidecar.config.loader import ConfigError
from sidecar.config.models import StoreConfig
from sidecar.store.base import Store
from sidecar.store.redis_cluster_url import CLUSTER_SCHEMES, as_cluster_url

STORE_SCHEMES = ("sqlite:///", "redis://", "rediss://", *CLUSTER_SCHEMES)


def store_url(
    config_path: Path, config: StoreConfig, environ: Mapping[str, str] = os.environ
) -> str:
    """`store.url`, or the variable `store.url_env` names (a URL with a password, from a
    secret); a named variable that is unset is an error, never a silent fallback. With
    `store.cluster: true` the Redis URL is read as naming cluster nodes."""
    if config.url_env is None:
        return config.effective_url
    url = environ.get(config.url_env, "").strip()
    if not url.startswith(STORE_SCHEMES):
        raise ConfigError(
            str(config_path),
            [
                f"{config_path}: store.url_env: ${config.url_env} must hold a store URL "
                "(sqlite:///, redis://, rediss:// or redis+cluster://)"
                + ("" if url else ", and it is not set")
            ],
        )
    if config.cluster:
        try:
            return as_cluster_url(url)
        except ValueError as exc:
            # The message names the scheme, never the URL (it may hold a password).
            raise ConfigError(
                str(config_path), [f"{config_path}: store.url_env: ${config.url_env}: {exc}"]
            ) from exc
    return url


async def open_store(url: str, *, owner: bool | None = None) -> Store:
    """`owner` (SQLite): True, this process alone uses the file and keeps its budgets in
    memory (`sqlite_owned.py`); False, one of several serving processes sharing it; None,
    neither claimed (tests, tools). Redis stores are always shared."""
    store: Store
    if url.startswith("sqlite:///"):
        from sidecar.store.sqlite_store import SQLiteStore

        if owner:
            from sidecar.store.sqlite_owned import OwnedSQLiteStore

            store = OwnedSQLiteStore(url)
        else:
            store = SQLiteStore(url, shared=owner is False)
    elif url.startswith(("redis://", "rediss://", *CLUSTER_SCHEMES)):
        from sidecar.store.redis_store import RedisStore

        store = RedisStore(url)
    else:
        raise ValueError(f"unsupported store URL scheme: {url.split(':', 1)[0]!r}")
    await store.open()
    return store
