"""Store memory of a 1-minute rolling window over many distinct tokens, for request and
token rules (`split: [token]`), in the worst case: every token spends in every one of the
window's 60 one-second slots, and made one real reservation and commit.

    .venv/bin/python -m bench.rate_window_memory                  # 10,000 tokens
    .venv/bin/python -m bench.rate_window_memory --tokens 2000    # quicker

The sidecar process keeps no per-bucket state (buckets live in the store), so this is the
memory such rules cost: Redis `used_memory` growth, and the SQLite file's size. Starts its
own redis-server. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from devtools.procs import start_redis
from sidecar.admission.plan import plan
from sidecar.model import TokenUsage
from sidecar.policy.rules import Rule, compile_rule
from sidecar.policy.windows import RollingWindow
from sidecar.store.base import Store
from sidecar.store.budget_types import LedgerDims, ReserveRequest
from sidecar.store.factory import open_store

T0 = 1_900_000_020.0
RULES: tuple[Rule, ...] = (
    compile_rule(
        name="agent-tpm",
        limit=200_000,
        window=RollingWindow(60),
        filters={},
        split=("token",),
        action="block",
        measure="tokens",
    ),
    compile_rule(
        name="agent-rpm",
        limit=600,
        window=RollingWindow(60),
        filters={},
        split=("token",),
        action="block",
        measure="requests",
    ),
)


def _ctx(n: int) -> dict[str, tuple[str, ...]]:
    return {
        "user": (f"agent-{n:05d}",),
        "token": (f"agent-{n:05d}",),
        "kind": ("service",),
        "group": (),
        "model": ("gpt-4o",),
        "provider": ("openai",),
    }


async def fill(store: Store, tokens: int) -> float:
    """Every slot of every bucket written, and one reservation per token; returns seconds."""
    started = time.perf_counter()
    for n in range(tokens):
        ctx = _ctx(n)
        # 59 earlier slots through the backfill path (the same slot layout commits write),
        # then a real reservation and commit in the current one.
        spend = []
        for second in range(59):
            for p in plan(RULES, ctx, T0 - 59 + second):
                spend.append((p.view, 1))
        await store.add_spend(f"bench-{n}", spend)
        views = tuple(p.view for p in plan(RULES, ctx, T0))
        rid = f"bench-{n:05d}"
        await store.reserve(
            ReserveRequest(
                rid,
                views,
                1_000,
                "reserve",
                T0,
                T0 + 600,
                LedgerDims(ctx["user"][0]),
                tokens=(50, 100),
            )
        )
        await store.commit(rid, 800, TokenUsage(40, 60), T0 + 1)
    return time.perf_counter() - started


async def measure(tokens: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis, port = start_redis(workdir)
        with redis:
            url = f"redis://127.0.0.1:{port}/0"
            client = Redis.from_url(url)
            before = int((await client.info("memory"))["used_memory"])
            store = await open_store(url)
            redis_seconds = await fill(store, tokens)
            await store.close()
            after = int((await client.info("memory"))["used_memory"])
            keys = int(await client.dbsize())
            await client.aclose()
        sqlite = await open_store(f"sqlite:///{workdir}/bench.db")
        sqlite_seconds = await fill(sqlite, tokens)
        await sqlite.close()
        size = sum(p.stat().st_size for p in workdir.glob("bench.db*"))
    return {
        "tokens": tokens,
        "rules": [r.name for r in RULES],
        "slots_per_bucket": 60,
        "redis_used_memory_mb": round((after - before) / 2**20, 1),
        "redis_keys": keys,
        "redis_fill_seconds": round(redis_seconds, 1),
        "sqlite_file_mb": round(size / 2**20, 1),
        "sqlite_fill_seconds": round(sqlite_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.tokens))))


if __name__ == "__main__":
    main()
