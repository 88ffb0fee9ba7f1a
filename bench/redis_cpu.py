"""Redis CPU per budget decision (reserve + commit), read from Redis's own accounting.

    .venv/bin/python -m bench.redis_cpu              # 3 rounds of 2,000 decisions per store
    .venv/bin/python -m bench.redis_cpu --rounds 5 --fresh --save
    .venv/bin/python -m bench.redis_cpu --baseline 070a5e4   # also the scripts of a commit
    .venv/bin/python -m bench.redis_cpu --batch 16   # charged 16 at a time, as the access log
    .venv/bin/python -m bench.redis_cpu --pin        # client on one core, Redis on another
    .venv/bin/python -m bench.redis_cpu --cluster-order grouped   # each node's callers in a run

The real engine decides for many users against a real redis-server, then against a real
Redis Cluster of three primaries, in the same run; each admitted request is then committed
with a realistic cost: right after its check, or with `--batch N` N requests at a time
through `charge_many`, as an access log batch charges them (a baseline commits each).
Two policies: `bench` (the benchmark policy: 6 rules that apply plus
the account rules, 7 buckets per request, 4 of them shared by every user: per group, per
model, org-wide) for 50 users, and `per-owner` (5 rules split by user, so every bucket
belongs to one user) for 1,000 users. Unless `--fresh`, every rolling-window bucket first
gets spend in each of its slots, as after a day of traffic. Before each measured round the
statistics are reset (`CONFIG RESETSTAT`); afterwards `INFO commandstats` gives the
microseconds Redis spent in each command. Of several rounds the least disturbed (the
fastest) is reported.

Redis CPU per decision = script usec / decisions, summed over shards. A shard serves at
most 1e6 / (its script usec per decision) decisions per second, so the store's capacity
is 1e6 / (the busiest shard's usec per decision): on one Redis that is its whole cost, on a
cluster the busiest shard sets the ceiling (buckets every request shares sit on one shard).
`--baseline REF` runs this benchmark as it was at git commit REF (its own store and
scripts, from `git archive`) in the same invocation, for a before/after ratio.
On the cluster, callers take turns (`--cluster-order interleaved`, the default), so on a
machine with fewer cores than nodes the nodes take turns on one core, each finding its
caches filled by the others; `grouped` lets the callers whose buckets live on one shard
decide one after another, so each node serves runs of decisions warm, as a node with a
core of its own does (the decisions and every shard's work are the same).
Prints one JSON object (`--save` also writes it to bench/results/redis_cpu.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.crc import key_slot

from bench.micro.test_engine_micro import make_engine
from bench.pinning import pinned
from bench.policy import BIG, BODY, PATH, bench_config
from devtools.config import demo_key_env
from devtools.keys import DevIssuer
from devtools.procs import start_redis
from devtools.redis_cluster import start_redis_cluster
from sidecar.config.loader import parse_config
from sidecar.config.ruleset import build_ruleset
from sidecar.model import RequestAttrs, TokenUsage
from sidecar.store.base import Store
from sidecar.store.budget_types import BucketView, ReserveRequest, ReserveResult
from sidecar.store.redis_keys import bucket_owner
from sidecar.store.redis_store import RedisStore
from tests.support.redis_admin import flush_redis

USERS = {"bench": 50, "per-owner": 1000}
ROLLING_SLOTS = 60  # sidecar.policy.windows: a rolling window of a minute or more
COST = 1_500  # µUSD charged per request at commit
USAGE = TokenUsage(input_tokens=20, output_tokens=40)


def per_owner_rules() -> list[dict[str, Any]]:
    """Five rules split by user: every bucket a request touches is its caller's own."""

    def rule(name: str, window: dict[str, str], **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "budget_usd": BIG,
            "window": window,
            "action": "block",
            "split": ["user"],
            **extra,
        }

    return [
        rule("per-user-daily", {"fixed": "daily"}),
        rule("per-user-weekly-openai", {"fixed": "weekly"}, filter={"provider": ["openai"]}),
        rule("per-user-monthly", {"fixed": "monthly"}),
        rule("per-user-hourly", {"rolling": "1h"}),
        {**rule("user-model-24h", {"rolling": "24h"}), "split": ["user", "model"]},
    ]


POLICIES: dict[str, list[dict[str, Any]] | None] = {"bench": None, "per-owner": per_owner_rules()}


def command_usec(stats: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """{command: (calls, usec)} from `INFO commandstats` as redis-py parses it."""
    out: dict[str, tuple[int, int]] = {}
    for name, value in stats.items():
        if name.startswith("cmdstat_"):
            out[name.removeprefix("cmdstat_")] = (int(value["calls"]), int(value["usec"]))
    return out


class Recorder:
    """The store, noting every bucket a reservation names (to fill them afterwards)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.buckets: dict[str, BucketView] = {}

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        for view in request.buckets:
            self.buckets[view.key] = view
        return await self.store.reserve(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def fill_rolling_windows(store: Store, buckets: dict[str, BucketView]) -> int:
    """Give every rolling-window bucket spend in each of its 60 slots, as after a day of
    traffic: a fresh store has one or two slots per bucket and would flatter any design
    that re-reads them all. Returns how many slots were written."""
    written = 0
    for key, view in buckets.items():
        if view.since == view.slot:
            continue  # a fixed window is one slot
        step = (view.slot - view.since) // (ROLLING_SLOTS - 1)
        spend = [
            (
                BucketView(
                    key, s, view.since, view.ttl_seconds, view.limit, view.enforce, view.measure
                ),
                1,
            )
            for s in range(view.since, view.slot, step)
        ]
        await store.add_spend(f"bench-fill:{key}", spend)
        written += len(spend)
    return written


class Run:
    """One policy on one store: the engine, its callers and the store's statistics."""

    def __init__(
        self,
        url: str,
        stat_urls: list[str],
        policy: str,
        workdir: Path,
        name: str,
        *,
        prefix: str | None = None,
        clock: Callable[[], float] = time.time,
        batch: int = 1,
        grouped: bool = False,
    ) -> None:
        self.url, self.stat_urls, self.policy = url, stat_urls, policy
        # Each policy under its own key prefix unless told: both share one Redis (one cluster).
        self.prefix = f"bench-{policy}:" if prefix is None else prefix
        # The time the engine decides and commits at (windows, expiries, key lifetimes).
        self.clock = clock
        # Commits per store call: 1 commits each request right after its check; more
        # charge them `batch` at a time with `charge_many`, as an access log batch does.
        self.batch = batch
        # On a cluster, callers in the order of the shard their own buckets live on.
        self.grouped = grouped
        self.uncharged: list[str] = []
        issuer = DevIssuer.generate()
        jwks = issuer.write_jwks(workdir / f"jwks-{name.replace('/', '-')}.json")
        self.ruleset = build_ruleset(
            parse_config(bench_config(issuer, str(jwks), url, rules=POLICIES[policy]))
        )
        self.users = USERS[policy]
        self.tokens = [
            issuer.mint(f"user{i}@example.com", ["eng", "ml"], ttl=6 * 3600)
            for i in range(self.users)
        ]
        self.measured: list[tuple[int, float, list[dict[str, Any]]]] = []
        self.next_id = 0

    async def setup(self, warmup: int, steady: bool) -> None:
        """At least `warmup` decisions and one per user, then (if `steady`) every
        rolling-window bucket filled as after a day of traffic."""
        self.store = RedisStore(self.url, prefix=self.prefix)
        recorder = Recorder(self.store)
        self.engine = make_engine(self.ruleset, recorder)
        self.engine.clock = self.clock
        self.admins = [aioredis.Redis.from_url(u, decode_responses=True) for u in self.stat_urls]
        self.next_id = max(warmup, self.users)
        for n in range(self.next_id):
            await self.decide(n)
        await self.charge_uncharged()
        if steady:
            await fill_rolling_windows(self.store, recorder.buckets)
        if self.grouped and len(self.admins) > 1:
            await self._group_callers(recorder.buckets)

    async def _group_callers(self, buckets: dict[str, BucketView]) -> None:
        """Reorder the callers so that those whose buckets share a shard decide one after
        another: each node then serves a run of decisions while the others idle, as each
        would with a core of its own, instead of three nodes taking turns on one core (and
        its caches) every decision on a machine with fewer cores than nodes."""
        ports = [int(u.rsplit(":", 1)[1].split("/")[0]) for u in self.stat_urls]
        ranges = await self.admins[0].cluster("SLOTS")

        def node(slot: int) -> int:
            for first, last, primary, *_ in ranges:
                if first <= slot <= last:
                    return ports.index(int(primary[1]))
            raise LookupError(f"no node serves slot {slot}")

        shard = {}
        for key in buckets:
            owner = bucket_owner(key)
            caller = re.fullmatch(r"user=user(\d+)@example\.com", owner)
            if caller is not None:
                shard[int(caller.group(1))] = node(key_slot(f"o:{owner}".encode()))
        order = sorted(range(self.users), key=lambda i: (shard.get(i, len(ports)), i))
        self.tokens = [self.tokens[i] for i in order]

    async def decide(self, n: int) -> None:
        headers = {
            "content-type": "application/json",
            "cf-access-jwt-assertion": self.tokens[n % self.users],
        }
        decision = await self.engine.check(RequestAttrs("POST", PATH, headers, BODY, f"r-{n}"))
        if not decision.allowed:
            raise RuntimeError(f"refused: {decision.body!r}")
        if self.batch > 1:
            self.uncharged.append(decision.request_id)
            if len(self.uncharged) >= self.batch:
                await self.charge_uncharged()
            return
        result = await self.store.commit(decision.request_id, COST, USAGE, self.clock())
        if result.status != "committed":
            raise RuntimeError(f"commit: {result}")

    async def charge_uncharged(self) -> None:
        """Charge the requests decided since the last batch, in one `charge_many` (a store
        without it, as older ones were, commits each)."""
        ids, self.uncharged = self.uncharged, []
        if not ids:
            return
        if not hasattr(self.store, "charge_many"):
            results: list[Any] = [
                await self.store.commit(rid, COST, USAGE, self.clock()) for rid in ids
            ]
        else:
            from sidecar.store.budget_types import Charge  # as old as charge_many

            charge = Charge(COST, USAGE)
            results = await self.store.charge_many(
                [(rid, lambda _: charge) for rid in ids], self.clock()
            )
        for result in results:
            if isinstance(result, Exception) or result.status != "committed":
                raise RuntimeError(f"charge: {result}")

    async def decide_next(self, decisions: int) -> None:
        """The next `decisions` decisions (request ids and callers continue from the last),
        every one charged by the time this returns."""
        for n in range(self.next_id, self.next_id + decisions):
            await self.decide(n)
        await self.charge_uncharged()
        self.next_id += decisions

    async def reset_stats(self) -> None:
        for admin in self.admins:
            await admin.config_resetstat()

    async def command_stats(self) -> list[dict[str, tuple[int, int]]]:
        """{command: (calls, usec)} since `reset_stats`, per shard."""
        return [command_usec(await admin.info("commandstats")) for admin in self.admins]

    async def round(self, decisions: int) -> None:
        await self.reset_stats()
        cpu_before = [await _cpu_seconds(admin) for admin in self.admins]
        started = time.perf_counter()
        await self.decide_next(decisions)
        elapsed = time.perf_counter() - started
        shards: list[dict[str, Any]] = []
        for admin, before in zip(self.admins, cpu_before, strict=True):
            cpu = await _cpu_seconds(admin) - before
            stats = command_usec(await admin.info("commandstats"))
            # Commands a script calls are counted twice in Redis 7's commandstats (on their
            # own and inside EVALSHA, or FCALL for the budget functions), so a decision's
            # cost is the scripts' time, not the sum.
            scripts = {k: v for k, v in stats.items() if k in ("evalsha", "eval", "fcall")}
            shards.append(
                {
                    "script_usec": sum(u for _, u in scripts.values()),
                    "script_calls": sum(c for c, _ in scripts.values()),
                    "process_cpu_usec": round(cpu * 1e6),
                    "calls_per_decision": {
                        k: round(c / decisions, 1)
                        for k, (c, _) in sorted(stats.items())
                        if k != "config|resetstat"
                    },
                    # Nested commands' own time: what is left of the scripts' time is Lua.
                    "usec_per_decision": {
                        k: round(u / decisions, 2)
                        for k, (_, u) in sorted(stats.items())
                        if k != "config|resetstat"
                    },
                }
            )
        self.measured.append((sum(sh["script_usec"] for sh in shards), elapsed, shards))

    async def close(self) -> None:
        for admin in self.admins:
            await admin.aclose()
        await self.store.close()

    def result(self, decisions: int) -> dict[str, Any]:
        # The least disturbed round counts: other processes on the machine only ever add to
        # a round's time (Redis's usec are wall-clock microseconds).
        script_usec, elapsed, shards = min(self.measured, key=lambda m: m[0])
        busiest = max(sh["script_usec"] for sh in shards)
        busiest_cpu = max(sh["process_cpu_usec"] for sh in shards)
        return {
            "policy": self.policy,
            "decisions": decisions,
            "rounds": len(self.measured),
            "shards": len(shards),
            # EVALSHA/FCALL usec_per_call; a decision is one reserve and one commit (per shard).
            "script_usec_per_call": round(
                script_usec / max(sum(sh["script_calls"] for sh in shards), 1), 1
            ),
            "script_usec_per_decision": round(script_usec / decisions, 1),
            "script_usec_per_decision_each_round": [
                round(m[0] / decisions, 1) for m in self.measured
            ],
            "busiest_shard_script_usec_per_decision": round(busiest / decisions, 1),
            # What the redis-server processes used (network I/O and parsing included).
            "process_cpu_usec_per_decision": round(
                sum(sh["process_cpu_usec"] for sh in shards) / decisions, 1
            ),
            "busiest_shard_process_cpu_usec_per_decision": round(busiest_cpu / decisions, 1),
            # The store's ceiling: the busiest shard's core busy 100% of the time in scripts.
            "decisions_per_second": round(1e6 * decisions / busiest),
            "client_seconds": round(elapsed, 2),
            "per_shard": shards,
        }


async def measure_all(
    stores: dict[str, tuple[str, list[str]]], args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """Every policy on every store, rounds interleaved so that a busy moment on the machine
    spreads over all of them instead of skewing one."""
    os.environ.update(demo_key_env())
    runs = {
        f"{policy}/{name}": Run(
            url,
            stat_urls,
            policy,
            workdir,
            f"{policy}/{name}",
            batch=args.batch,
            grouped=args.cluster_order == "grouped",
        )
        for name, (url, stat_urls) in stores.items()
        for policy in POLICIES
    }
    for url, _ in stores.values():
        await flush_redis(url)
    for run in runs.values():
        await run.setup(args.warmup, not args.fresh)
    for _ in range(args.rounds):
        for run in runs.values():
            await run.round(args.decisions)
    for run in runs.values():
        await run.close()
    return {name: run.result(args.decisions) for name, run in runs.items()}


def baseline(ref: str, args: argparse.Namespace) -> dict[str, Any]:
    """This benchmark as it was at git commit `ref`, with that commit's store and scripts,
    in a subprocess (its own one Redis and cluster)."""
    root = Path(__file__).resolve().parent.parent
    # Here, not at the top: this module also runs inside older trees, which lack it.
    from bench.alternate import extract_tree

    with tempfile.TemporaryDirectory() as tmp:
        extract_tree(ref, tmp)
        argv = [
            sys.executable,
            "-m",
            "bench.redis_cpu",
            "--decisions",
            str(args.decisions),
            "--rounds",
            str(args.rounds),
            "--warmup",
            str(args.warmup),
        ]
        if args.fresh:
            argv.append("--fresh")
        done = subprocess.run(
            argv,
            cwd=tmp,
            # This tree's devtools after the commit's own (bench.policy imports it; the
            # archive holds only sidecar and bench).
            env={**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{root}"},
            capture_output=True,
            text=True,
            check=True,
        )
    old: dict[str, Any] = json.loads(done.stdout)
    return old


async def _cpu_seconds(admin: aioredis.Redis) -> float:
    info = await admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--decisions", type=int, default=2000, help="per round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="measured rounds; the least disturbed one is reported"
    )
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="charge requests this many at a time (`charge_many`, as an access log batch "
        "does); 1: commit each right after its check. A baseline commits each.",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="leave rolling windows as the warmup left them (1-2 slots)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run this benchmark as of git commit REF, for a ratio",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="this process on one core, every redis-server it starts (a baseline's too) on "
        "another (bench/pinning.py)",
    )
    parser.add_argument(
        "--cluster-order",
        choices=("interleaved", "grouped"),
        default="interleaved",
        help="on the cluster, callers in turn (interleaved) or those of one shard after "
        "another (grouped: each node runs warm, as with a core of its own)",
    )
    parser.add_argument(
        "--save", action="store_true", help="write the result to bench/results/redis_cpu.json"
    )
    args = parser.parse_args(argv)
    with pinned() if args.pin else contextlib.nullcontext():
        result = _measure_everything(args)
    text = json.dumps(result, indent=2) + "\n"
    sys.stdout.write(text)
    if args.save:
        Path(__file__).with_name("results").joinpath("redis_cpu.json").write_text(text)
    return 0


def _measure_everything(args: argparse.Namespace) -> dict[str, Any]:
    # The decision log would be most of the client's time; Redis's share is what is measured.
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        proc, port = start_redis(workdir / "redis")
        with proc, start_redis_cluster(workdir / "cluster", 3) as cluster:
            url = f"redis://127.0.0.1:{port}/0"
            result = asyncio.run(
                measure_all(
                    {
                        "one_redis": (url, [url]),
                        "cluster_3_primaries": (cluster.url, cluster.node_urls()),
                    },
                    args,
                    workdir,
                )
            )
    result["batch"] = args.batch
    result["pinned"] = args.pin
    result["cluster_order"] = args.cluster_order
    # What adding shards buys: the busiest shard sets the ceiling.
    result["cluster_3_over_one"] = {
        policy: round(
            result[f"{policy}/cluster_3_primaries"]["decisions_per_second"]
            / result[f"{policy}/one_redis"]["decisions_per_second"],
            2,
        )
        for policy in POLICIES
    }
    if args.baseline:
        old = baseline(args.baseline, args)
        # Commits before the policies were named report the bench policy's rows unnamed.
        old_one = old.get("bench/one_redis") or old["one_redis"]
        old_cluster = old.get("bench/cluster_3_primaries") or old["cluster_3_primaries"]
        new_one = result["bench/one_redis"]
        result["baseline"] = {
            "ref": args.baseline,
            "one_redis_script_usec_per_decision": old_one["script_usec_per_decision"],
            "one_redis_process_cpu_usec_per_decision": old_one["process_cpu_usec_per_decision"],
            "cluster_3_decisions_per_second": old_cluster.get(
                "decisions_per_second_all_shards", old_cluster.get("decisions_per_second")
            ),
            # Redis CPU per decision now / at the baseline (bench policy, one Redis).
            "script_usec_now_over_baseline": round(
                new_one["script_usec_per_decision"] / old_one["script_usec_per_decision"], 2
            ),
            "process_cpu_now_over_baseline": round(
                new_one["process_cpu_usec_per_decision"] / old_one["process_cpu_usec_per_decision"],
                2,
            ),
            "output": old,  # every row of the commit's run
        }
    return result


if __name__ == "__main__":
    raise SystemExit(main())
