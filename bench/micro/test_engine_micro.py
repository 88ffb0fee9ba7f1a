"""Engine decisions per second: the whole check (cached JWT, 20 rules, reserve) in process,
with the budget store stubbed out (the engine alone) and with a real SQLite store."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench.policy import BODY, PATH, token
from devtools.keys import DevIssuer
from sidecar.config.ruleset import RuleSet, RuleSetHolder
from sidecar.engine import Engine
from sidecar.identity.authenticate import Authenticator
from sidecar.identity.jwks import JwksCache
from sidecar.identity.jwt_verify import IssuerPolicy, JwtVerifier
from sidecar.model import RequestAttrs
from sidecar.store.budget_types import BucketState, ReserveRequest, ReserveResult
from sidecar.store.sqlite_store import SQLiteStore

BATCH = 200


class AdmitAll:
    """A store that admits everything at once: what the engine costs without a store."""

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        return ReserveResult(
            True, (), tuple(BucketState(0, request.amount) for _ in request.buckets)
        )


def authenticator(rs: RuleSet) -> Authenticator:
    issuers = [
        IssuerPolicy(
            issuer=i.issuer,
            audiences=i.audiences,
            algorithms=i.algorithms,
            groups_claim=i.groups_claim,
            leeway_seconds=i.leeway_seconds,
            keys=JwksCache(file=i.jwks_file),
        )
        for i in rs.config.identity.jwt.issuers
    ]
    return Authenticator(JwtVerifier(issuers, rs.directory), None)


def make_engine(rs: RuleSet, store: object) -> Engine:
    auth = authenticator(rs)
    return Engine(RuleSetHolder(rs), store, lambda _: auth)  # type: ignore[arg-type]


def requests(issuer: DevIssuer) -> Iterator[RequestAttrs]:
    headers = {"content-type": "application/json", "cf-access-jwt-assertion": token(issuer)}
    for n in itertools.count():
        yield RequestAttrs("POST", PATH, headers, BODY, f"req-{n}")


def run_batch(
    loop: asyncio.AbstractEventLoop, engine: Engine, attrs: Iterator[RequestAttrs]
) -> None:
    async def batch() -> None:
        for _ in range(BATCH):
            decision = await engine.check(next(attrs))
            assert decision.allowed, decision.body

    loop.run_until_complete(batch())


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(f"sqlite:///{tmp_path}/micro.db")
    yield store
    await store.close()


def _report(benchmark: BenchmarkFixture) -> None:
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is not None:
        benchmark.extra_info["decisions_per_second"] = round(BATCH / stats.median)


def test_engine_check_no_store(
    benchmark: BenchmarkFixture,
    ruleset: RuleSet,
    issuer: DevIssuer,
    loop: asyncio.AbstractEventLoop,
) -> None:
    engine = make_engine(ruleset, AdmitAll())
    attrs = requests(issuer)
    run_batch(loop, engine, attrs)  # fills the JWT and price caches, as a running sidecar has
    benchmark.pedantic(run_batch, args=(loop, engine, attrs), rounds=20, warmup_rounds=1)
    _report(benchmark)


def test_engine_check_sqlite(
    benchmark: BenchmarkFixture,
    ruleset: RuleSet,
    issuer: DevIssuer,
    tmp_path: Path,
    loop: asyncio.AbstractEventLoop,
) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path}/micro.db")
    engine = make_engine(ruleset, store)
    attrs = requests(issuer)
    try:
        run_batch(loop, engine, attrs)
        benchmark.pedantic(run_batch, args=(loop, engine, attrs), rounds=10, warmup_rounds=1)
    finally:
        loop.run_until_complete(store.close())
    _report(benchmark)
