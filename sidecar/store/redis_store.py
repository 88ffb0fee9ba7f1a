"""The distributed store: budgets, ledger and documents in Redis, shared by every replica.

Each budget decision is one Lua script call (EVALSHA, reloaded by redis-py when Redis has
forgotten the script), so a decision is one atomic step and one round trip; the scripts and
the data layout are documented in `sidecar/budget/lua/`. Key names come from
`sidecar.store.redis_keys.redis_key`; all budget keys share one hash tag, which keeps the
scripts valid in Redis Cluster and pins budget state to one shard. A `redis+cluster://` URL
selects redis-py's cluster client (`sidecar.store.redis_cluster_url`); everything else is
the same on one Redis and on a cluster.

Amounts travel to Lua as decimal strings and come back as integers; Lua computes with
doubles, so amounts are exact up to 2^53 µUSD (about $9 billion).

Semantics follow the SQLite store, with deliberate differences only in retention and one
in comparison: done reservations are kept 7 days after they finish (SQLite: after they were
created); ledger hours are kept 400 days after their last new row (SQLite: forever); and
swap_doc compares canonical JSON text, so 1 and 1.0 differ (SQLite compares decoded values).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from importlib.resources import files
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MasterDownError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from sidecar.model import TokenUsage
from sidecar.store.base import Doc, StoreUnavailable
from sidecar.store.budget_types import (
    BucketState,
    BucketView,
    CommitResult,
    LedgerPart,
    LedgerRow,
    Reservation,
    ReservationState,
    ReserveRequest,
    ReserveResult,
    dims_from_json,
    dims_to_json,
)
from sidecar.store.redis_cluster_url import is_cluster_url, parse_cluster_url
from sidecar.store.redis_keys import DEFAULT_PREFIX, KeyKind, check_prefix, redis_key
from sidecar.store.redis_script import LuaScript

# Committed and expired reservations are kept this long so late or duplicate completions
# are recognised instead of charged twice.
_DONE_RETENTION_SECONDS = 7 * 24 * 3600
# Usage reports look back a year; a little more so a full year is always there.
_LEDGER_RETENTION_SECONDS = 400 * 24 * 3600
# Same as the SQLite store: bounded so one reserve never does unbounded catch-up work.
_SETTLE_ON_RESERVE = 100
# Dead slot fields dropped per script call, and script calls per settle_expired at most.
# One-second slots of short rolling windows die at up to one per busy bucket per second,
# so pruning keeps calling while it finds full batches, in short calls that never hold
# Redis for long (1,000 fields take about a millisecond).
_SLOT_PRUNE_BATCH = 1000
_SLOT_PRUNE_ROUNDS = 50
# A hold must outlive its reservation by a margin, because expired reservations are only
# settled when the next reserve or settle_expired runs.
_HOLD_GRACE_SECONDS = 3600

# A failover turns the old primary read-only: as transient as a dropped connection. In a
# cluster, a shard whose primary is gone answers CLUSTERDOWN (or its slots are uncovered)
# until a replica takes over: the same, for the keys on that shard only.
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, ClusterDownError,
              ClusterError, MasterDownError, TryAgainError, RedisClusterException)

Client = aioredis.Redis | RedisCluster


def _lua(name: str) -> str:
    return files("sidecar.budget").joinpath("lua", name).read_text(encoding="utf-8")


def _budget_script(name: str) -> str:
    # Redis scripts cannot call each other; the shared helpers are prepended instead. The
    # first line names the script, for whoever finds it in SCRIPT or SLOWLOG output.
    return f"-- {name}, after budget_lib.lua\n{_lua('budget_lib.lua')}\n{_lua(name)}"


def _canonical(doc: Doc) -> str:
    # swap_doc compares stored strings, so one document must always serialize one way.
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


@contextmanager
def _guard() -> Iterator[None]:
    try:
        yield
    except _TRANSIENT as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc


class RedisStore:
    """The `Store` Protocol on one Redis (or one Redis Cluster shard for budgets)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout: float = 2.0,
        op_timeout: float = 2.0,
        health_check_interval: int = 15,
    ) -> None:
        self._prefix = check_prefix(prefix)
        # One retry: enough to replace a pooled connection Redis closed while idle, short
        # enough that a dead Redis fails the decision fast. Retrying a script that did run
        # before its reply was lost is safe: reserve and commit are idempotent per request
        # id (the retry reports a duplicate and charges nothing twice).
        backoff = ExponentialWithJitterBackoff(base=0.01, cap=0.1)
        self._r: Client
        # Set once a cluster client has learned the slot layout; None for one Redis.
        self._cluster_ready: asyncio.Event | None = None
        self._discovering = asyncio.Lock()
        if is_cluster_url(url):
            self._cluster_ready = asyncio.Event()
            target = parse_cluster_url(url)
            # The client learns the slot layout from any startup node and follows MOVED/ASK
            # redirections and failovers itself. require_full_coverage=False: a shard that is
            # down must not stop the client from serving keys on the others.
            self._r = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                username=target.username, password=target.password, ssl=target.tls,
                require_full_coverage=False,
                decode_responses=True,
                socket_connect_timeout=connect_timeout,
                socket_timeout=op_timeout,
                health_check_interval=health_check_interval,
                retry=AsyncRetry(backoff, retries=1),
            )
        else:
            self._r = aioredis.Redis.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=connect_timeout,
                socket_timeout=op_timeout,
                health_check_interval=health_check_interval,
                retry=Retry(backoff, retries=1),
            )
        self._reserve = LuaScript(self._r, _budget_script("reserve.lua"))
        self._commit = LuaScript(self._r, _budget_script("commit.lua"))
        self._settle = LuaScript(self._r, _budget_script("settle.lua"))
        self._swap = LuaScript(self._r, _lua("swap_doc.lua"))
        self._add_spend = LuaScript(self._r, _budget_script("add_spend.lua"))
        self._list = LuaScript(self._r, _lua("list_docs.lua"))

    @asynccontextmanager
    async def _op(self) -> AsyncIterator[None]:
        """One store operation: transient Redis errors become StoreUnavailable, and a
        cluster client learns the slot layout once, before its first command."""
        with _guard():
            if self._cluster_ready is not None and not self._cluster_ready.is_set():
                await self._discover()
            yield

    async def _discover(self) -> None:
        # redis-py discovers the layout on first use, but many first commands at once race
        # each other while it does (connections closed under them): one discovery, shared.
        assert isinstance(self._r, RedisCluster) and self._cluster_ready is not None
        async with self._discovering:
            if not self._cluster_ready.is_set():
                await self._r.initialize()
                self._cluster_ready.set()

    def _key(self, kind: KeyKind, *parts: str | int) -> str:
        return redis_key(self._prefix, kind, *parts)

    # -- plumbing ----------------------------------------------------------------------
    async def open(self) -> None:
        # Connections are made on first use: a replica must be able to start while Redis
        # is down (fail_open), and readiness is reported by ping().
        return None

    async def close(self) -> None:
        await self._r.aclose()

    async def ping(self) -> bool:
        try:
            if isinstance(self._r, RedisCluster):
                async with self._op():
                    pass
                # Ready when the shard holding budget state answers: a PING to every node
                # would report a whole cluster down for one shard that is.
                node = self._r.get_node_from_key(self._key("open"))
                return bool(await self._r.ping(target_nodes=node))
            return bool(await self._r.ping())
        except (RedisError, OSError, StoreUnavailable):
            return False

    # -- documents ---------------------------------------------------------------------
    async def get_doc(self, collection: str, key: str, *, now: float) -> Doc | None:
        async with self._op():
            raw = await self._r.get(self._key("doc", collection, key))
        return None if raw is None else dict(json.loads(raw))

    async def put_doc(
        self, collection: str, key: str, doc: Doc, ttl_seconds: int | None = None, *,
        now: float,
    ) -> None:
        doc_key, index = self._key("doc", collection, key), self._key("docs", collection)
        async with self._op(), self._r.pipeline(transaction=True) as pipe:
            if ttl_seconds is not None and ttl_seconds <= 0:
                # Already expired: Redis refuses a zero TTL, and the doc must not show.
                pipe.delete(doc_key)
                pipe.srem(index, doc_key)
            else:
                pipe.set(doc_key, _canonical(doc), ex=ttl_seconds)
                pipe.sadd(index, doc_key)
            await pipe.execute()

    async def delete_doc(self, collection: str, key: str) -> bool:
        doc_key, index = self._key("doc", collection, key), self._key("docs", collection)
        async with self._op(), self._r.pipeline(transaction=True) as pipe:
            pipe.delete(doc_key)
            pipe.srem(index, doc_key)
            deleted, _ = await pipe.execute()
        return int(deleted) > 0

    async def list_docs(self, collection: str, *, now: float) -> list[Doc]:
        async with self._op():
            flat = await self._list(keys=[self._key("docs", collection)])
        pairs = sorted(zip(flat[::2], flat[1::2], strict=True))
        return [dict(json.loads(doc)) for _, doc in pairs]

    async def swap_doc(
        self, collection: str, key: str, expected: Doc | None, new: Doc | None,
        ttl_seconds: int | None = None, *, now: float,
    ) -> bool:
        if new is not None and ttl_seconds is not None and ttl_seconds <= 0:
            new = None  # written already expired: the same as deleting it
        args = [
            "" if expected is None else _canonical(expected),
            "0" if new is None else "1",
            "" if new is None else _canonical(new),
            "" if ttl_seconds is None else str(ttl_seconds),
        ]
        keys = [self._key("doc", collection, key), self._key("docs", collection)]
        async with self._op():
            return int(await self._swap(keys=keys, args=args)) == 1

    async def scrub(self) -> None:
        # Redis keeps no remnants of a replaced value in memory; RDB/AOF files written
        # before are the operator's to rotate (see README, secrets at rest).
        return None

    async def incr(self, key: str, amount: int, ttl_seconds: int, *, now: float) -> int:
        counter = self._key("counter", key)
        async with self._op(), self._r.pipeline(transaction=True) as pipe:
            pipe.incrby(counter, amount)
            # NX: the window starts at the first increment and later ones don't extend it.
            pipe.expire(counter, ttl_seconds, nx=True)
            value, _ = await pipe.execute()
        return int(value)

    # -- budgets -----------------------------------------------------------------------
    def _budget_keys(self) -> list[str]:
        return [self._key("open"), self._key("slots"), self._key("hours")]

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        hour = int(request.now) // 3600 * 3600
        bucket_keys = [self._key("bucket", b.key) for b in request.buckets]
        amounts = [request.amount_for(b) for b in request.buckets]
        held = request.mode == "reserve"
        record = [[k, b.slot, b.slot + b.ttl_seconds, b.ttl_seconds, b.measure, amount,
                   amount if held else 0]
                  for k, b, amount in zip(bucket_keys, request.buckets, amounts, strict=True)]
        hold_for = math.ceil(request.expires_at - request.now) + _HOLD_GRACE_SECONDS
        args: list[str | int] = [
            repr(float(request.now)), _SETTLE_ON_RESERVE, str(request.amount), request.mode,
            repr(float(request.expires_at)), hour, self._key("ledger", hour),
            dims_to_json(request.dims), json.dumps(record), _LEDGER_RETENTION_SECONDS,
            _DONE_RETENTION_SECONDS,
            json.dumps([[b.since, b.limit, 1 if b.enforce else 0, max(b.ttl_seconds, hold_for),
                         amount, b.slot]
                        for b, amount in zip(request.buckets, amounts, strict=True)]),
            request.binding, request.tokens[0], request.tokens[1],
        ]
        keys = [*self._budget_keys(), self._key("reservation", request.request_id),
                *bucket_keys]
        async with self._op():
            admitted, duplicate, failed, spent, reserved, conflict = await self._reserve(
                keys=keys, args=args)
        states = tuple(BucketState(int(s), int(r)) for s, r in zip(spent, reserved, strict=True))
        return ReserveResult(bool(admitted), tuple(int(i) for i in failed), states,
                             duplicate=bool(duplicate), conflict=bool(conflict))

    async def reservation(self, request_id: str) -> Reservation | None:
        async with self._op():
            state, estimate, dims, tokens_in, tokens_out = await self._r.hmget(
                self._key("reservation", request_id), ["s", "e", "d", "ti", "to"])
        states: dict[object, ReservationState] = {
            "open": "open", "committed": "committed", "expired": "expired"}
        if state not in states or estimate is None or dims is None:
            return None
        return Reservation(request_id, states[state], int(estimate), dims_from_json(str(dims)),
                           (int(tokens_in or 0), int(tokens_out or 0)))

    async def commit(
        self, request_id: str, actual_micros: int, usage: TokenUsage, now: float,
        error: bool = False,
        others: Sequence[LedgerPart] = (),
        tokens: tuple[int, int] | None = None,
    ) -> CommitResult:
        open_key, slots, hours = self._budget_keys()
        keys = [self._key("reservation", request_id), open_key, slots, hours]
        budget_in, budget_out = (usage.total_input, usage.output_tokens) if tokens is None \
            else tokens
        args: list[str | int] = [
            str(actual_micros), str(usage.total_input), str(usage.output_tokens),
            _LEDGER_RETENTION_SECONDS, _DONE_RETENTION_SECONDS, 1 if error else 0,
            json.dumps([[dims_to_json(p.dims), p.cost, p.input_tokens, p.output_tokens]
                        for p in others]),
            str(budget_in), str(budget_out),
        ]
        async with self._op():
            status, estimate = await self._commit(keys=keys, args=args)
        return CommitResult(status, int(estimate))

    async def bucket_states(self, buckets: list[BucketView], now: float) -> list[BucketState]:
        # A plain read: no decision depends on it being one atomic snapshot.
        async with self._op(), self._r.pipeline(transaction=False) as pipe:
            for b in buckets:
                pipe.hgetall(self._key("bucket", b.key))
            hashes: list[dict[str, str]] = await pipe.execute()
        states = []
        for b, fields in zip(buckets, hashes, strict=True):
            # Other fields than slots: "r" reserved, "t"/"f" a running total, "k" alive until.
            slots = {int(f): int(v) for f, v in fields.items()
                     if f.isdigit() and int(f) >= b.since}
            states.append(BucketState(sum(slots.values()), int(fields.get("r", 0)), slots))
        return states

    async def add_spend(self, marker: str, spend: list[tuple[BucketView, int]]) -> bool:
        keys = [self._key("backfill", marker), self._key("slots"),
                *(self._key("bucket", view.key) for view, _ in spend)]
        args: list[str | int] = []
        for view, amount in spend:
            args += [view.slot, str(amount), view.slot + view.ttl_seconds, view.ttl_seconds]
        async with self._op():
            applied = await self._add_spend(keys=keys, args=args)
        return bool(applied)

    async def settle_expired(self, now: float, limit: int = 500) -> int:
        oldest_hour = (int(now) - _LEDGER_RETENTION_SECONDS) // 3600 * 3600
        args: list[str | int] = [
            repr(float(now)), limit, int(now), _SLOT_PRUNE_BATCH, _LEDGER_RETENTION_SECONDS,
            _DONE_RETENTION_SECONDS, oldest_hour,
        ]
        settled = 0
        async with self._op():
            for _ in range(_SLOT_PRUNE_ROUNDS):
                count, pruned = await self._settle(keys=self._budget_keys(), args=args)
                settled += int(count)
                if int(pruned) < _SLOT_PRUNE_BATCH:
                    break
                args[1] = 0  # later rounds only prune: reservations were settled
        return settled

    async def open_reservations(self) -> int:
        async with self._op():
            return int(await self._r.zcard(self._key("open")))

    # -- ledger ------------------------------------------------------------------------
    async def ledger_rows(self, start_hour: int, end_hour: int) -> list[LedgerRow]:
        async with self._op():
            members = cast(list[str], await self._r.zrangebyscore(
                self._key("hours"), start_hour, f"({end_hour}"))
            hours = [int(h) for h in members]
            async with self._r.pipeline(transaction=False) as pipe:
                for hour in hours:
                    pipe.hgetall(self._key("ledger", hour))
                hashes: list[dict[str, str]] = await pipe.execute()
        rows = []
        for hour, fields in zip(hours, hashes, strict=True):
            totals: dict[str, dict[str, int]] = {}
            for field, value in fields.items():
                measure, dims = field.split("|", 1)
                totals.setdefault(dims, {})[measure] = int(value)
            rows += [
                LedgerRow(hour, dims_from_json(dims), t.get("c", 0), t.get("n", 0),
                          t.get("i", 0), t.get("o", 0), t.get("e", 0))
                for dims, t in sorted(totals.items())
            ]
        return rows
