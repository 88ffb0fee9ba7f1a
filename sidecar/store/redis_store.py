"""The distributed store: budgets, ledger and documents in Redis, shared by every replica.

Budget decisions are Lua scripts (`sidecar/store/lua/`, where the data layout is
documented), one per shard a request's buckets live on: on one Redis that is one script
call per reserve and per commit. Key names come from `sidecar.store.redis_keys.redis_key`:
each bucket carries its own hash tag, so on a Redis Cluster (`redis+cluster://`, redis-py's
cluster client, `sidecar.store.redis_cluster_url`) buckets spread over the shards and
decisions per second grow with them. A request is reserved shard by shard (concurrently),
admitted only when every shard admitted it, and released on the shards that held when one
refused; its commit is idempotent per shard (`sidecar.store.redis_shards`).

Amounts travel to Lua as decimal strings and come back as integers; Lua computes with
doubles, so amounts are exact up to 2^53 µUSD (about $9 billion).

Documents and counters expire by the `now` their callers pass, as on SQLite: a document
with a TTL stores its expiry with it, a counter its window's end (see swap_doc.lua and
incr.lua); Redis's own TTLs, of the same length, only collect them.

Semantics follow the SQLite store, with deliberate differences only in retention and one
in comparison: done reservations are kept 7 days after they finish (SQLite: after they were
created); ledger hours are kept 400 days after their last new row (SQLite: forever); and
swap_doc compares canonical JSON text, so 1 and 1.0 differ (SQLite compares decoded values).
On a cluster, `add_spend` is atomic per shard and once per bucket (SQLite: all at once).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
import struct
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from importlib.resources import files
from typing import Any, NamedTuple, cast

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.client import NEVER_DECODE
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MasterDownError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from sidecar.model import TokenUsage
from sidecar.store import redis_record
from sidecar.store.base import (
    Doc,
    ShardUnavailable,
    StoreUnavailable,
)
from sidecar.store.budget_types import (
    BucketState,
    BucketView,
    Charge,
    CommitResult,
    CommitStatus,
    LedgerPart,
    LedgerRow,
    Pricer,
    Reservation,
    ReservationState,
    ReserveRequest,
    ReserveResult,
    dims_from_json,
    dims_to_json,
)
from sidecar.store.redis_cluster_url import is_cluster_url, parse_cluster_url
from sidecar.store.redis_functions import BUDGET_SCRIPTS, FunctionCluster, Library, LuaFunction
from sidecar.store.redis_keys import DEFAULT_PREFIX, KeyKind, check_prefix, redis_key
from sidecar.store.redis_lane import ScriptLane
from sidecar.store.redis_script import LuaScript
from sidecar.store.redis_shards import SINGLE_TAG, Shards

log = structlog.get_logger()

# Committed and expired reservations are kept this long so late or duplicate completions
# are recognised instead of charged twice.
_DONE_RETENTION_SECONDS = 7 * 24 * 3600
# Usage reports look back a year; a little more so a full year is always there.
_LEDGER_RETENTION_SECONDS = 400 * 24 * 3600
# Same as the SQLite store: bounded so one reserve never does unbounded catch-up work.
_SETTLE_ON_RESERVE = 100
# Dead slot fields dropped per script call, and script calls per shard and settle_expired
# at most. One-second slots of short rolling windows die at up to one per busy bucket per
# second, so pruning keeps calling while it finds full batches, in short calls that never
# hold Redis for long (1,000 fields take about a millisecond).
_SLOT_PRUNE_BATCH = 1000
_SLOT_PRUNE_ROUNDS = 50
# A hold must outlive its reservation by a margin, because expired reservations are only
# settled when the next reserve or settle_expired runs.
_HOLD_GRACE_SECONDS = 3600

# A failover turns the old primary read-only: as transient as a dropped connection. In a
# cluster, a shard whose primary is gone answers CLUSTERDOWN (or its slots are uncovered)
# until a replica takes over: the same, for the keys on that shard only.
_TRANSIENT = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    TryAgainError,
    RedisClusterException,
)

# What a script says when a key it touches is being moved to another shard.
_MIGRATING = ("non local key", "TRYAGAIN", "ASK", "MOVED", "CROSSSLOT")

Client = aioredis.Redis | RedisCluster

# BITFIELD reads of a bucket's counters (spent, held, window, alive-until) and of a ledger
# row (cost, requests, input and output tokens, errors): see budget_lib.lua.
_COUNTERS = ("GET", "i64", "#0", "GET", "i64", "#1", "GET", "i64", "#2", "GET", "i64", "#3")
_ROW = (*_COUNTERS, "GET", "i64", "#4")


def _lua(name: str) -> str:
    return files("sidecar.store").joinpath("lua", name).read_text(encoding="utf-8")


def _budget_library(cluster: bool) -> Library:
    # Redis scripts cannot call each other: the scripts share budget_lib.lua's helpers as
    # functions of one library (redis_functions).
    return Library(
        _lua("budget_lib.lua"), {name: _lua(f"{name}.lua") for name in BUDGET_SCRIPTS}, cluster
    )


def _canonical(doc: Doc) -> str:
    # swap_doc compares stored strings, so one document must always serialize one way.
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _stored(doc: Doc, ttl_seconds: int | None, now: float) -> str:
    """A document as stored: a document with a TTL carries its expiry, from the caller's
    `now`, as "x<expires at>\n" before its canonical JSON (see swap_doc.lua)."""
    if ttl_seconds is None:
        return _canonical(doc)
    return f"x{float(now) + ttl_seconds!r}\n{_canonical(doc)}"


def _live(raw: str, now: float) -> Doc | None:
    """The document of a stored value, None once its stored expiry is at or before `now`.
    Values without the prefix (no TTL, or written before expiries were stored) are read
    as they are: Redis's TTL alone ends those."""
    if raw.startswith("x"):
        expires, _, raw = raw[1:].partition("\n")
        if float(expires) <= now:
            return None
    return dict(json.loads(raw))


@contextmanager
def _guard(cluster: bool) -> Iterator[None]:
    try:
        yield
    except (*_TRANSIENT, ResponseError) as exc:
        failure = _unavailable(exc, cluster)
        if failure is exc:
            raise
        raise failure from exc


def _unavailable(exc: Exception, cluster: bool) -> Exception:
    """What a Redis error becomes for the store's callers (`exc` itself: not transient)."""
    if isinstance(exc, _TRANSIENT):
        # On a cluster an error is one node's: the other shards serve on.
        return (ShardUnavailable if cluster else StoreUnavailable)(f"redis: {exc}")
    if cluster and isinstance(exc, ResponseError) and any(s in str(exc) for s in _MIGRATING):
        # A script that met keys being migrated to another shard (resharding): transient.
        return ShardUnavailable(f"redis: {exc}")
    return exc


# The reservation fields of a record of the earlier layout (a hash): state, estimate, dims,
# estimated tokens.
_RECORD_FIELDS = ["s", "e", "d", "ti", "to"]
_RECORD_STATES: dict[object, ReservationState] = {
    "open": "open",
    "committed": "committed",
    "expired": "expired",
    "o": "open",
    "c": "committed",
    "x": "expired",
}


def _record_fields(raw: object) -> tuple[object, ...]:
    """(state, estimate, dims, estimated tokens in, out, home) of a stored record: its
    bytes, or the `_RECORD_FIELDS` (and "hm") of a record of the earlier layout; Nones when
    there is none."""
    if isinstance(raw, list):
        return tuple(raw)
    if not isinstance(raw, bytes):
        return (None,) * 6
    state, estimate, dims, tokens_in, tokens_out, home = redis_record.fields(raw)
    return state, estimate, dims, tokens_in, tokens_out, "1" if home else "0"


def _reservation(request_id: str, fields: Sequence[object]) -> Reservation | None:
    """The reservation of a home record's `_record_fields` (None: no such record)."""
    state, estimate, dims, tokens_in, tokens_out = fields[:5]
    if state not in _RECORD_STATES or estimate is None or dims is None:
        return None
    return Reservation(
        request_id,
        _RECORD_STATES[state],
        int(str(estimate)),
        dims_from_json(str(dims)),
        (int(str(tokens_in or 0)), int(str(tokens_out or 0))),
    )


# A reservation id minted on a cluster: 128 random bits, ".", the node tag of the shard its
# home record lives on (a shard, never whose request it is).
_CARRIED = re.compile(r"[0-9a-f]{32}\.(n[0-9]{1,6})")


def _is_wrongtype(reply: object) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


@functools.cache
def _measure_text(measure: str) -> bytes:
    return redis_record.text(measure)


def _budget_tokens(charge: Charge) -> tuple[int, int]:
    """The (input, output) tokens `charge` charges token buckets: its own, else its usage's."""
    usage = charge.usage
    return (usage.total_input, usage.output_tokens) if charge.tokens is None else charge.tokens


def _booked(charge: Charge) -> str:
    """The parts of `charge` booked under other ledger dimensions, as the scripts read them
    (JSON: dims, cost, input and output tokens per part)."""
    if not charge.others:
        return "[]"
    return json.dumps(
        [[dims_to_json(p.dims), p.cost, p.input_tokens, p.output_tokens] for p in charge.others]
    )


def _commit_args(charge: Charge, now: float) -> list[str | int]:
    """commit.lua's ARGV[5] to ARGV[14] for `charge`."""
    usage = charge.usage
    budget_in, budget_out = _budget_tokens(charge)
    return [
        str(charge.micros),
        str(usage.total_input),
        str(usage.output_tokens),
        _LEDGER_RETENTION_SECONDS,
        _DONE_RETENTION_SECONDS,
        1 if charge.error else 0,
        _booked(charge),
        str(budget_in),
        str(budget_out),
        repr(float(now)),
    ]


# reserve.lua's numbers: now, expires_at, expired records to settle first, 1 for an
# optimistic admission, retention of done records, ledger TTL, a hold's lifetime.
_RESERVE_NUMBERS = struct.Struct(">ddibqqq")

# commit_many.lua's numbers of one record: cost, ledger input and output tokens, 1 when
# the provider answered with an error, budget input and output tokens.
_COMMIT_NUMBERS = struct.Struct(">qqqbqq")


def _commit_many_args(charge: Charge) -> tuple[bytes, str]:
    """commit_many.lua's two arguments for `charge`: its numbers, and the parts booked under
    other ledger dimensions (JSON)."""
    usage = charge.usage
    budget_in, budget_out = _budget_tokens(charge)
    numbers = _COMMIT_NUMBERS.pack(
        charge.micros,
        usage.total_input,
        usage.output_tokens,
        1 if charge.error else 0,
        budget_in,
        budget_out,
    )
    return numbers, _booked(charge)


def _sum_answered(replies: Sequence[int | BaseException]) -> int:
    """The sum over the shards that answered; an error only when none did."""
    answered = [r for r in replies if isinstance(r, int)]
    errors = [r for r in replies if isinstance(r, BaseException)]
    if errors and not answered:
        raise errors[0]
    return sum(answered)


class _BucketNames(NamedTuple):
    bucket: str  # the hash of a rolling window's slots
    counters: str
    bucket_text: bytes  # the same names as a record holds them (redis_record.text)
    counters_text: bytes


# Bucket names remembered at most (then forgotten all at once, and learnt again): ~900
# bytes each, so about 18 MB at most.
_NAMES_KEPT = 20_000


# Records one commit_many.lua call commits at most: the call holds Redis for about 0.1 ms a
# record, and the buckets they share are read and written once per call.
_COMMITS_PER_CALL = 16


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
            self._r = FunctionCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                username=target.username,
                password=target.password,
                ssl=target.tls,
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
        cluster = isinstance(self._r, RedisCluster)
        # On one Redis, scripts (every budget decision) skip redis-py's general command
        # path: see redis_lane. A cluster's need its routing and redirections.
        self._lane = (
            None
            if isinstance(self._r, RedisCluster)
            else ScriptLane(self._r, op_timeout, AsyncRetry(backoff, retries=1))
        )
        scripts: aioredis.Redis | RedisCluster | ScriptLane = self._lane or self._r
        self._shards = Shards(self._r if isinstance(self._r, RedisCluster) else None)
        self._registered: set[str] = set()
        self._indexes: dict[str, tuple[str, str, str, str]] = {}
        self._bucket_names: dict[str, _BucketNames] = {}
        self._known: set[str] = set()
        self._registry_read = False
        library = _budget_library(cluster)
        load = (self._lane or cast(FunctionCluster, self._r)).load_library

        def budget(script: str) -> LuaFunction:
            return LuaFunction(scripts, library, script, load)

        self._reserve = budget("reserve")
        self._commit = budget("commit")
        self._commit_many = budget("commit_many")
        self._release_script = budget("release")
        self._settle = budget("settle")
        self._settle_part = budget("settle_part")
        self._swap = LuaScript(scripts, _lua("swap_doc.lua"))
        self._add_spend = budget("add_spend")
        self._list = LuaScript(scripts, _lua("list_docs.lua"))
        self._incr = LuaScript(scripts, _lua("incr.lua"))

    @asynccontextmanager
    async def _op(self) -> AsyncIterator[None]:
        """One store operation: transient Redis errors become StoreUnavailable, and a
        cluster client learns the slot layout once, before its first command."""
        with _guard(self._cluster_ready is not None):
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
        if self._lane is not None:
            await self._lane.aclose()
        if isinstance(self._r, FunctionCluster):
            await self._r.close_for_good()
        else:
            await self._r.aclose()

    async def ping(self) -> bool:
        try:
            if isinstance(self._r, RedisCluster):
                async with self._op():
                    primaries = self._r.get_primaries()
                # Ready while any shard answers: budget state is spread over all of them,
                # and a shard that is down fails only the decisions whose buckets it holds.
                replies = await asyncio.gather(
                    *(self._r.ping(target_nodes=node) for node in primaries), return_exceptions=True
                )
                return any(reply is True for reply in replies)
            return bool(await self._r.ping())
        except (RedisError, OSError, StoreUnavailable):
            return False

    # -- documents ---------------------------------------------------------------------
    async def get_doc(self, collection: str, key: str, *, now: float) -> Doc | None:
        async with self._op():
            raw = await self._r.get(self._key("doc", collection, key))
        return None if raw is None else _live(str(raw), now)

    async def put_doc(
        self,
        collection: str,
        key: str,
        doc: Doc,
        ttl_seconds: int | None = None,
        *,
        now: float,
    ) -> None:
        doc_key, index = self._key("doc", collection, key), self._key("docs", collection)
        async with self._op(), self._r.pipeline(transaction=True) as pipe:
            if ttl_seconds is not None and ttl_seconds <= 0:
                # Already expired: Redis refuses a zero TTL, and the doc must not show.
                pipe.delete(doc_key)
                pipe.srem(index, doc_key)
            else:
                # Redis's TTL only collects the document; reads judge expiry by `now`.
                pipe.set(doc_key, _stored(doc, ttl_seconds, now), ex=ttl_seconds)
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
        docs = (_live(str(raw), now) for _, raw in pairs)
        return [doc for doc in docs if doc is not None]

    async def swap_doc(
        self,
        collection: str,
        key: str,
        expected: Doc | None,
        new: Doc | None,
        ttl_seconds: int | None = None,
        *,
        now: float,
    ) -> bool:
        if new is not None and ttl_seconds is not None and ttl_seconds <= 0:
            new = None  # written already expired: the same as deleting it
        args = [
            "" if expected is None else _canonical(expected),
            "0" if new is None else "1",
            "" if new is None else _stored(new, ttl_seconds, now),
            "" if ttl_seconds is None else str(ttl_seconds),
            repr(float(now)),
        ]
        keys = [self._key("doc", collection, key), self._key("docs", collection)]
        async with self._op():
            return int(await self._swap(keys=keys, args=args)) == 1

    async def scrub(self) -> None:
        # Redis keeps no remnants of a replaced value in memory; RDB/AOF files written
        # before are the operator's to rotate (see README, secrets at rest).
        return None

    async def incr(self, key: str, amount: int, ttl_seconds: int, *, now: float) -> int:
        # The window starts at the first increment (at `now`) and later ones don't extend it.
        args: list[str | int] = [
            amount,
            ttl_seconds,
            repr(float(now)),
            repr(float(now) + ttl_seconds),
        ]
        async with self._op():
            return int(await self._incr(keys=[self._key("counter", key)], args=args))

    # -- budgets -----------------------------------------------------------------------
    def _index_keys(self, tag: str) -> list[str]:
        keys = self._indexes.get(tag)
        if keys is None:
            keys = self._indexes[tag] = (
                self._key("open", tag),
                self._key("held", tag),
                self._key("hours", tag),
                self._key("slots", tag),
            )
        return list(keys)

    def _names(self, bucket: str) -> _BucketNames:
        """A bucket's key names (remembered: the same buckets come back decision after
        decision, and building them was a sixth of a reserve's CPU)."""
        names = self._bucket_names.get(bucket)
        if names is None:
            if len(self._bucket_names) >= _NAMES_KEPT:
                self._bucket_names.clear()
            hashed = self._key("bucket", bucket)
            counters = self._key("counters", bucket)
            names = _BucketNames(
                hashed, counters, redis_record.text(hashed), redis_record.text(counters)
            )
            self._bucket_names[bucket] = names
        return names

    async def _call(
        self, script: LuaScript | LuaFunction, keys: list[str], args: Sequence[str | int | bytes]
    ) -> Any:
        if self._cluster_ready is not None:
            async with self._op():
                return await script(keys=keys, args=args)
        # One Redis: `_op` without its context managers (two per call, on every decision).
        try:
            return await script(keys=keys, args=args)
        except (*_TRANSIENT, ResponseError) as exc:
            failure = _unavailable(exc, False)
            if failure is exc:
                raise
            raise failure from exc

    async def _register(self, tags: Sequence[str]) -> None:
        """Note node tags in the registry, so every replica's expiry sweep and ledger reads
        find them even after the layout changed (best effort: retried on the next use)."""
        new = [t for t in tags if t not in self._registered]
        if not new or self._shards.single:
            return
        try:
            async with self._op():
                await self._r.sadd(self._key("tags"), *new)
        except StoreUnavailable:
            return
        self._registered.update(new)
        self._known.update(new)

    async def _all_tags(self, refresh: bool = False) -> list[str]:
        """Every node tag budget state may be under: the current layout's and the
        registry's (read once, and again on `refresh`)."""
        async with self._op():
            tags = set(self._shards.current_tags())
        if self._shards.single:
            return sorted(tags)
        if refresh or not self._registry_read:
            try:
                async with self._op():
                    members = await self._r.smembers(self._key("tags"))
                self._known.update(str(m) for m in members)
                self._registry_read = True
            except StoreUnavailable:
                pass
        return sorted(tags | self._known)

    def _groups(self, request: ReserveRequest) -> dict[str, list[int]]:
        """Bucket indices by the node tag of their shard, in request order; the shard an id
        names for its home record is one of them (with no bucket of its own if need be)."""
        groups: dict[str, list[int]] = {}
        try:
            if self._shards.single:
                if request.buckets:
                    groups[SINGLE_TAG] = list(range(len(request.buckets)))
            else:
                for i, view in enumerate(request.buckets):
                    tag = self._shards.tag_of(self._names(view.key).bucket)
                    groups.setdefault(tag, []).append(i)
            carried = self._carried(request.request_id)
            if carried is not None:
                groups.setdefault(carried, [])
            if not groups:
                groups[self._shards.tag_of(self._key("home", request.request_id))] = []
        except LookupError as exc:
            raise ShardUnavailable(f"redis: {exc}") from exc
        return groups

    def mint_request_id(self, buckets: Sequence[BucketView]) -> str:
        """A new reservation id (see Engine._mint). On a cluster it names the node tag of
        its first bucket's shard, where its home record will live: a commit then finds the
        record from the id alone, without a pointer. A shard that cannot be told (a layout
        not learnt yet) gives a plain id, found through the pointer."""
        plain = uuid.uuid4().hex
        if self._shards.single or not buckets:
            return plain
        try:
            return f"{plain}.{self._shards.tag_of(self._key('bucket', buckets[0].key))}"
        except (LookupError, RedisClusterException):
            return plain

    def _carried(self, request_id: str) -> str | None:
        """The node tag a cluster-minted id names (None for any other id)."""
        if self._shards.single:
            return None
        match = _CARRIED.fullmatch(request_id)
        return None if match is None else match.group(1)

    async def _home_of(self, request_id: str) -> str | None:
        """The node tag of the shard holding the request's home record (None: no such
        request). One Redis has one; on a cluster the id names it, or, for ids minted
        elsewhere, a pointer under the request id does, and every shard is asked when the
        pointer is missing or its shard does not answer."""
        if self._shards.single:
            return SINGLE_TAG
        carried = self._carried(request_id)
        if carried is not None:
            return carried
        try:
            async with self._op():
                tag = await self._r.get(self._key("home", request_id))
            if tag is not None:
                return str(tag)
        except ShardUnavailable:
            pass
        tags = await self._all_tags()
        replies = await asyncio.gather(
            *(self._is_home(self._key("record", t, request_id)) for t in tags),
            return_exceptions=True,
        )
        for t, reply in zip(tags, replies, strict=True):
            if reply is True:
                return t
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply  # the record may be on a shard that did not answer
        return None

    async def _is_home(self, key: str) -> bool:
        (fields,) = await self._records([key])
        return fields[5] == "1"

    async def _records(self, keys: Sequence[str]) -> list[tuple[object, ...]]:
        """`_record_fields` of each record, read in one round trip (and one more for
        records of the earlier layout, which are hashes)."""
        async with self._op(), self._r.pipeline(transaction=False) as pipe:
            for key in keys:
                # Records are bytes (redis_record), not text.
                pipe.execute_command("GET", key, **{NEVER_DECODE: []})
            raws: list[object] = await pipe.execute(raise_on_error=False)
            old = [i for i, raw in enumerate(raws) if _is_wrongtype(raw)]
            if old:
                for i in old:
                    pipe.hmget(keys[i], [*_RECORD_FIELDS, "hm"])
                for i, fields in zip(old, await pipe.execute(), strict=True):
                    raws[i] = fields
        for raw in raws:
            if isinstance(raw, Exception):
                raise raw
        return [_record_fields(raw) for raw in raws]

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        if self._shards.single:
            # Nothing to learn first and nothing to register on one Redis.
            groups = self._groups(request)
            result, _ = await self._attempt(request, SINGLE_TAG, groups)
            return result
        async with self._op():
            groups = self._groups(request)
        await self._register(list(groups))
        # The home record goes with the first bucket (on a cluster, usually all of a
        # caller's own buckets are there too: one script for the whole decision), or where
        # the id says, unless the id already has a home: then that shard decides whether it
        # is a repeat.
        carried = self._carried(request.request_id)
        home = carried or next(iter(groups))
        if carried is not None:
            result, _ = await self._attempt(request, home, groups)
            return result
        hold_for = math.ceil(request.expires_at - request.now) + _HOLD_GRACE_SECONDS
        pointer = self._set_home(request.request_id, home, hold_for + _DONE_RETENTION_SECONDS)
        attempt, known = await asyncio.gather(
            self._attempt(request, home, groups), pointer, return_exceptions=True
        )
        if isinstance(attempt, BaseException):
            raise attempt
        result, fresh = attempt
        if isinstance(known, ShardUnavailable):
            # The pointer is a shortcut for commits (which otherwise ask every shard); its
            # shard being down must not fail decisions whose buckets are elsewhere.
            log.warning(
                "reservation_home_not_noted", request_id=request.request_id, error=str(known)
            )
        elif isinstance(known, BaseException):
            await self._release(request.request_id, request.binding, fresh)
            raise known
        elif known is not None and known != home:
            # The id already has its home elsewhere: undo, and decide again with that home
            # record (a repeat of that reservation, or a conflict).
            await self._release(request.request_id, request.binding, fresh)
            groups.setdefault(known, [])
            result, _ = await self._attempt(request, known, groups)
        return result

    async def _set_home(self, request_id: str, tag: str, ttl: int) -> str | None:
        """Point the request id at its home shard unless it points somewhere already; the
        shard it points at (None: it did not)."""
        async with self._op():
            known = await self._r.set(self._key("home", request_id), tag, nx=True, ex=ttl, get=True)
        return None if known is None else str(known)

    async def _attempt(
        self, request: ReserveRequest, home: str, groups: dict[str, list[int]]
    ) -> tuple[ReserveResult, list[str]]:
        """Reserve shard by shard with the home record on `home`; the result, and the
        shards that hold for it now."""
        hour = int(request.now) // 3600 * 3600
        amounts = [request.amount_for(b) for b in request.buckets]
        held = request.mode == "reserve"
        hold_for = math.ceil(request.expires_at - request.now) + _HOLD_GRACE_SECONDS
        rid = request.request_id
        calls = []
        # The record's score in its expiry index, in whole seconds rounded up: a sorted set
        # this small keeps scores in a listpack, where an integer is stored and compared as
        # one, while a fraction is printed with %.17g when added and parsed back with strtod
        # on every look-up (the most costly command of a reserve). The record keeps its exact
        # expiry; the sweep finds it within a second after.
        expires = str(math.ceil(request.expires_at))
        numbers = _RESERVE_NUMBERS.pack(
            request.now,
            request.expires_at,
            _SETTLE_ON_RESERVE,
            0 if held else 1,
            _DONE_RETENTION_SECONDS,
            _LEDGER_RETENTION_SECONDS,
            hold_for,
        )
        dims = dims_to_json(request.dims)
        for tag, members in groups.items():
            entries: list[bytes] = []
            for i in members:
                view, amount = request.buckets[i], amounts[i]
                names = self._names(view.key)
                # A rolling window's slots live in a hash; a fixed window is its counters.
                rolling = view.since != view.slot
                entries.append(
                    redis_record.bucket(
                        names.counters_text,
                        names.bucket_text if rolling else redis_record.NO_TEXT,
                        _measure_text(view.measure),
                        (view.slot, view.since, view.ttl_seconds),
                        amount,
                        amount if held else 0,
                        view.limit if view.enforce else None,
                    )
                )
            is_home = tag == home
            index = self._index_keys(tag)
            if self._shards.single:
                index[1] = ""  # one Redis: every group is a home group, nothing is held
            record = redis_record.record(
                redis_record.Head(
                    request.amount,
                    request.expires_at,
                    is_home,
                    hour,
                    request.tokens,
                    request.now,
                    request.binding,
                    # Only the home record books the ledger (and says for whom the
                    # reservation is).
                    dims if is_home else "",
                    self._key("ledger_index", tag, hour) if is_home else "",
                    ",".join(t for t in groups if t != home) if is_home else "",
                    rid,
                ),
                entries,
            )
            # A held bucket lives its TTL past the hold's end: a commit before the
            # reservation expires then never has to extend it.
            args: list[str | int | bytes] = [*index, expires, record, numbers]
            calls.append(self._call(self._reserve, [self._key("record", tag, rid)], args))
        replies: list[Any]
        if len(calls) == 1:
            # One shard (always, on one Redis): no Task to gather it in.
            try:
                replies = [await calls[0]]
            except Exception as exc:
                replies = [exc]
        else:
            replies = await asyncio.gather(*calls, return_exceptions=True)
        states: list[BucketState] = [BucketState(0, 0)] * len(request.buckets)
        statuses: dict[str, str] = {}
        failed: list[int] = []
        errors: list[BaseException] = []
        expired: list[str] = []
        for (tag, members), reply in zip(groups.items(), replies, strict=True):
            if isinstance(reply, BaseException):
                errors.append(reply)
                continue
            status, fails, spent, reserved, parts = reply
            expired += [str(p) for p in parts]
            statuses[tag] = str(status)
            for j, i in enumerate(members):
                states[i] = BucketState(int(spent[j]), int(reserved[j]))
            failed += [members[int(f)] for f in fails]
        fresh = [tag for tag, status in statuses.items() if status == "new"]
        for rid_done, tags in zip(expired[::2], expired[1::2], strict=True):
            # Reservations this decision settled on their home shard: their other parts too.
            await self._settle_parts(rid_done, tags, request.now)
        if errors:
            # All or nothing: what the shards that answered held for this request is let go.
            await self._release(rid, request.binding, fresh)
            raise errors[0]
        # The home record says whose request id this is: a repeat of an open reservation
        # changes nothing, and an id already used by another request is refused.
        conflict = "conflict" in statuses.values()
        duplicate = statuses[home] == "dup" and not conflict
        if duplicate or conflict or "refused" in statuses.values():
            await self._release(rid, request.binding, fresh)
            # Reported as seen, before this attempt's (now released) holds.
            for tag in fresh:
                for i in groups[tag]:
                    hold = amounts[i] if held else 0
                    states[i] = BucketState(states[i].spent, states[i].reserved - hold)
            fresh = []
        if duplicate:
            return ReserveResult(True, (), tuple(states), duplicate=True), fresh
        if conflict or failed:
            return ReserveResult(
                False, () if conflict else tuple(sorted(failed)), tuple(states), conflict=conflict
            ), fresh
        return ReserveResult(True, (), tuple(states)), fresh

    async def _release(self, request_id: str, binding: str, tags: Sequence[str]) -> None:
        """Undo the holds this attempt made on `tags` (best effort: a hold left behind only
        makes room scarcer until the reservation expires, it never lets spend through)."""
        replies = await asyncio.gather(
            *(
                self._call(
                    self._release_script,
                    [self._key("record", tag, request_id)],
                    [binding, self._key("open", tag), self._key("held", tag)],
                )
                for tag in tags
            ),
            return_exceptions=True,
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                log.warning("reservation_release_failed", request_id=request_id, error=str(reply))

    async def reservation(self, request_id: str) -> Reservation | None:
        home = await self._home_of(request_id)
        if home is None:
            return None
        (fields,) = await self._records([self._key("record", home, request_id)])
        return _reservation(request_id, fields)

    async def commit(
        self,
        request_id: str,
        actual_micros: int,
        usage: TokenUsage,
        now: float,
        error: bool = False,
        others: Sequence[LedgerPart] = (),
        tokens: tuple[int, int] | None = None,
    ) -> CommitResult:
        home = await self._home_of(request_id)
        if home is None:
            return CommitResult("unknown", 0)
        return await self._commit_at(
            home,
            request_id,
            _commit_args(Charge(actual_micros, usage, error, tuple(others), tokens), now),
        )

    async def _commit_at(self, home: str, request_id: str, args: list[str | int]) -> CommitResult:
        """`commit` of a request whose home record is on the shard of node tag `home`."""
        record = self._key("record", home, request_id)
        status, estimate, rest = await self._call(
            self._commit, [record], [*self._index_keys(home), *args, ""]
        )
        replies = await self._commit_parts(request_id, str(rest), args)
        if status == "pending":
            late = any(reply[0] == "late" for reply in replies)
            status, estimate, _ = await self._call(
                self._commit, [record], [*self._index_keys(home), *args, "1" if late else "0"]
            )
        return CommitResult(status, int(estimate))

    async def _commit_parts(
        self, request_id: str, tags: str, args: list[str | int]
    ) -> list[tuple[str, int, str]]:
        """Commit the parts of a reservation on the shards of `tags` (comma-separated node
        tags, as its home record names them), each once however often this is repeated: a
        failure here raises, and the repeated commit (spooled) finishes them."""
        replies = await asyncio.gather(
            *(
                self._call(
                    self._commit,
                    [self._key("record", tag, request_id)],
                    [*self._index_keys(tag), *args, "0"],
                )
                for tag in tags.split(",")
                if tag
            ),
            return_exceptions=True,
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return cast(list[tuple[str, int, str]], replies)

    async def charge(self, request_id: str, price: Pricer, now: float) -> CommitResult:
        # The record is read, priced here and committed by the script, which judges its
        # state again (a commit racing this one is charged once); the home shard is looked
        # up once for both.
        home = await self._home_of(request_id)
        if home is None:
            return CommitResult("unknown", 0)
        (fields,) = await self._records([self._key("record", home, request_id)])
        return await self._priced_commit(home, request_id, fields, price, now)

    async def _priced_commit(
        self, home: str, request_id: str, fields: Sequence[object], price: Pricer, now: float
    ) -> CommitResult:
        record = _reservation(request_id, fields)
        charge = price(record) if record is not None else None
        if charge is None:
            return CommitResult("unknown", 0)
        return await self._commit_at(home, request_id, _commit_args(charge, now))

    async def charge_many(
        self, charges: Sequence[tuple[str, Pricer]], now: float
    ) -> list[CommitResult | Exception]:
        # The records of each shard read in one round trip and priced here, then committed
        # _COMMITS_PER_CALL to a call (commit_many.lua: each bucket the records share read
        # and written once per call); shards side by side, each failing alone.
        answers: list[CommitResult | Exception] = [CommitResult("unknown", 0)] * len(charges)
        homes: Sequence[str | BaseException | None]
        if self._shards.single:
            homes = [SINGLE_TAG] * len(charges)
        else:
            homes = await asyncio.gather(
                *(self._home_of(request_id) for request_id, _ in charges), return_exceptions=True
            )
        by_home: dict[str, list[int]] = {}
        for index, home in enumerate(homes):
            if isinstance(home, Exception):
                answers[index] = home
            elif isinstance(home, BaseException):
                raise home  # cancelled: not an answer
            elif home is not None:
                by_home.setdefault(home, []).append(index)
        await asyncio.gather(
            *(
                self._charge_on(home, [*indexes], charges, answers, now)
                for home, indexes in by_home.items()
            )
        )
        return answers

    async def _charge_on(
        self,
        home: str,
        indexes: list[int],
        charges: Sequence[tuple[str, Pricer]],
        answers: list[CommitResult | Exception],
        now: float,
    ) -> None:
        """`charge_many` of the charges at `indexes`, whose home records are on `home`'s
        shard: their answers written into `answers`."""
        try:
            records = await self._records(
                [self._key("record", home, charges[i][0]) for i in indexes]
            )
        except Exception as exc:  # the shard's records are not readable: none is charged
            for index in indexes:
                answers[index] = exc
            return
        priced: list[tuple[int, str, Charge]] = []
        for index, fields in zip(indexes, records, strict=True):
            request_id, price = charges[index]
            record = _reservation(request_id, fields)
            try:
                charge = price(record) if record is not None else None
            except Exception as exc:  # the pricer's failure is that charge's answer
                answers[index] = exc
                continue
            if charge is not None:
                priced.append((index, request_id, charge))
        for start in range(0, len(priced), _COMMITS_PER_CALL):
            batch = priced[start : start + _COMMITS_PER_CALL]
            try:
                replies = await self._commit_batch(home, batch, now)
            except Exception as exc:  # the call failed as a whole: each of its charges did
                for index, _, _ in batch:
                    answers[index] = exc
                continue
            for (index, request_id, charge), (status, estimate, rest) in zip(
                batch, replies, strict=True
            ):
                try:
                    answers[index] = await self._after_home(
                        home, request_id, charge, status, estimate, rest, now
                    )
                except Exception as exc:
                    answers[index] = exc

    async def _commit_batch(
        self, home: str, batch: Sequence[tuple[int, str, Charge]], now: float
    ) -> list[tuple[str, int, str]]:
        """commit_many.lua over `batch` (index, request id, charge) on `home`'s shard: each
        home record's status, estimate and other parts' node tags."""
        keys = [self._key("record", home, request_id) for _, request_id, _ in batch]
        args: list[str | int | bytes] = [
            *self._index_keys(home),
            _LEDGER_RETENTION_SECONDS,
            _DONE_RETENTION_SECONDS,
            repr(float(now)),
            # One Redis has no parts elsewhere; on a cluster, a home record past its expiry
            # with parts elsewhere is answered "pending" (`_after_home` finishes it).
            "0" if self._shards.single else "",
        ]
        for _, _, charge in batch:
            args += _commit_many_args(charge)
        reply = await self._call(self._commit_many, keys, args)
        return [(reply[i], int(reply[i + 1]), str(reply[i + 2])) for i in range(0, len(reply), 3)]

    async def _after_home(
        self,
        home: str,
        request_id: str,
        charge: Charge,
        status: str,
        estimate: int,
        rest: str,
        now: float,
    ) -> CommitResult:
        """A charge whose home record commit_many.lua answered `status`: its parts on other
        shards committed too, whatever the home's status (as `_commit_at` commits them: a
        repeated charge finishes the parts an earlier one did not reach)."""
        if status == "pending":
            return await self._commit_at(home, request_id, _commit_args(charge, now))
        if rest:
            await self._commit_parts(request_id, rest, _commit_args(charge, now))
        return CommitResult(cast(CommitStatus, status), estimate)

    async def bucket_states(self, buckets: list[BucketView], now: float) -> list[BucketState]:
        # A plain read: no decision depends on it being one atomic snapshot.
        async with self._op(), self._r.pipeline(transaction=False) as pipe:
            for b in buckets:
                pipe.execute_command("BITFIELD_RO", self._key("counters", b.key), *_COUNTERS)
                pipe.hgetall(self._key("bucket", b.key))
            replies: list[Any] = await pipe.execute()
        states = []
        for b, counters, fields in zip(buckets, replies[::2], replies[1::2], strict=True):
            spent, held, window, alive = (int(v) for v in counters)
            # The hash: a rolling window's slots (and, for a bucket not touched since the
            # layout changed, "r" held and its slots: see budget_lib.lua).
            slots = {int(f): int(v) for f, v in fields.items() if f.isdigit() and int(f) >= b.since}
            if alive == 0:
                held = int(fields.get("r", 0))
            elif b.since == b.slot:
                slots = {b.slot: spent} if window == b.slot and spent else {}
            states.append(BucketState(sum(slots.values()), held, slots))
        return states

    async def add_spend(self, marker: str, spend: list[tuple[BucketView, int]]) -> bool:
        groups: dict[str, list[str | int]] = {}
        async with self._op():
            for view, amount in spend:
                key = self._key("bucket", view.key)
                try:
                    tag = self._shards.tag_of(key)
                except LookupError as exc:
                    raise ShardUnavailable(f"redis: {exc}") from exc
                groups.setdefault(tag, []).extend(
                    [
                        self._key("backfill", view.key, marker),
                        self._key("counters", view.key),
                        "" if view.since == view.slot else key,
                        view.slot,
                        str(amount),
                        view.ttl_seconds,
                    ]
                )
        replies = await asyncio.gather(
            *(
                self._call(self._add_spend, [self._key("slots", tag)], args)
                for tag, args in groups.items()
            ),
            return_exceptions=True,
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return any(int(r) > 0 for r in replies if not isinstance(r, BaseException))

    async def settle_expired(self, now: float, limit: int = 500) -> int:
        oldest_hour = (int(now) - _LEDGER_RETENTION_SECONDS) // 3600 * 3600
        tags = await self._all_tags(refresh=True)
        shares = dict.fromkeys(tags, limit)
        if len(tags) > 1:
            shares = await self._oldest_first(tags, now, limit)
        # A shard that is down is swept once it is back; the others are swept now.
        return _sum_answered(
            await asyncio.gather(
                *(self._settle_shard(tag, now, shares.get(tag, 0), oldest_hour) for tag in tags),
                return_exceptions=True,
            )
        )

    async def _oldest_first(self, tags: list[str], now: float, limit: int) -> dict[str, int]:
        """How many of the `limit` oldest expired reservations, over all shards, each
        shard holds (a shard that does not answer gets none)."""

        async def due(tag: str) -> list[tuple[float, str]]:
            async with self._op():
                found = cast(
                    list[tuple[str, float]],
                    await self._r.zrangebyscore(
                        self._key("open", tag),
                        "-inf",
                        repr(float(now)),
                        start=0,
                        num=limit,
                        withscores=True,
                    ),
                )
            return [(float(score), tag) for _, score in found]

        replies = await asyncio.gather(*(due(tag) for tag in tags), return_exceptions=True)
        expired = sorted(
            e for reply in replies if not isinstance(reply, BaseException) for e in reply
        )
        shares: dict[str, int] = {}
        for _, tag in expired[:limit]:
            shares[tag] = shares.get(tag, 0) + 1
        return shares

    async def _settle_shard(self, tag: str, now: float, limit: int, oldest_hour: int) -> int:
        # Parts whose home was never swept (a home shard that lost its data) are settled
        # on their own once their expiry is this far behind.
        orphaned = repr(float(now) - _HOLD_GRACE_SECONDS)
        args: list[str | int] = [
            repr(float(now)),
            limit,
            _LEDGER_RETENTION_SECONDS,
            _DONE_RETENTION_SECONDS,
            oldest_hour,
            _SLOT_PRUNE_BATCH,
            int(now),
            orphaned,
        ]
        settled = 0
        for _ in range(_SLOT_PRUNE_ROUNDS):
            count, pruned, parts = await self._call(self._settle, self._index_keys(tag), args)
            settled += int(count)
            for rid, tags in zip(parts[::2], parts[1::2], strict=True):
                await self._settle_parts(str(rid), str(tags), now)
            if int(pruned) < _SLOT_PRUNE_BATCH:
                break
            args[1] = 0  # later rounds only prune: records were settled
        return settled

    async def _settle_parts(self, request_id: str, tags: str, now: float) -> None:
        """Settle the other shards' parts of a reservation whose home was settled (a shard
        that does not answer settles its part on its next decision or sweep)."""
        replies = await asyncio.gather(
            *(
                self._call(
                    self._settle_part,
                    [self._key("record", tag, request_id)],
                    [*self._index_keys(tag), repr(float(now)), _DONE_RETENTION_SECONDS],
                )
                for tag in tags.split(",")
                if tag
            ),
            return_exceptions=True,
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                log.warning("expired_part_not_settled", request_id=request_id, error=str(reply))

    async def open_reservations(self) -> int:
        """Held reservations over the shards that answer (a shard that is down is left
        out of the count rather than failing it)."""
        tags = await self._all_tags()
        return _sum_answered(
            await asyncio.gather(*(self._count_open(tag) for tag in tags), return_exceptions=True)
        )

    async def _count_open(self, tag: str) -> int:
        async with self._op():
            return int(await self._r.zcard(self._key("open", tag)))

    # -- ledger ------------------------------------------------------------------------
    async def ledger_rows(self, start_hour: int, end_hour: int) -> list[LedgerRow]:
        # Each shard books the requests whose home group it holds: the rows of one hour
        # and dims are summed over the shards.
        totals: dict[tuple[int, str], dict[str, int]] = {}
        for tag in await self._all_tags():
            async with self._op():
                members = cast(
                    list[str],
                    await self._r.zrangebyscore(
                        self._key("hours", tag), start_hour, f"({end_hour}"
                    ),
                )
                hours = [int(h) for h in members]
                async with self._r.pipeline(transaction=False) as pipe:
                    for hour in hours:
                        pipe.hgetall(self._key("ledger", tag, hour))  # the earlier layout
                        pipe.smembers(self._key("ledger_index", tag, hour))
                    found: list[Any] = await pipe.execute()
                    rows = [
                        (hour, str(dims))
                        for hour, index in zip(hours, found[1::2], strict=True)
                        for dims in sorted(index)
                    ]
                    for hour, dims in rows:
                        pipe.execute_command(
                            "BITFIELD_RO", self._key("ledger_row", tag, hour, dims), *_ROW
                        )
                    values: list[list[int]] = await pipe.execute()
            for hour, fields in zip(hours, found[::2], strict=True):
                for field, value in fields.items():
                    measure, dims = field.split("|", 1)
                    row = totals.setdefault((hour, dims), {})
                    row[measure] = row.get(measure, 0) + int(value)
            for (hour, dims), counts in zip(rows, values, strict=True):
                row = totals.setdefault((hour, dims), {})
                for measure, value in zip("cnioe", counts, strict=True):
                    row[measure] = row.get(measure, 0) + int(value)
        return [
            LedgerRow(
                hour,
                dims_from_json(dims),
                t.get("c", 0),
                t.get("n", 0),
                t.get("i", 0),
                t.get("o", 0),
                t.get("e", 0),
            )
            for (hour, dims), t in sorted(totals.items())
        ]
