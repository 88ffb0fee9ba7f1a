"""JWT verification: a cached token (the steady state of a busy caller) and an uncached one
(the first request of a token: RS256 signature check and claim mapping)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture

from bench.micro.timing import median_seconds
from bench.policy import GROUPS, USER
from devtools.keys import DevIssuer
from sidecar.identity.jwt_verify import IssuerPolicy, JwtVerifier

BATCH = 500


class StaticKeys:
    def __init__(self, issuer: DevIssuer) -> None:
        self._key = issuer.key.public_key()

    async def key_for(self, kid: str) -> Any:
        return self._key


def verifier(issuer: DevIssuer, cache_size: int) -> JwtVerifier:
    policy = IssuerPolicy(
        issuer=issuer.issuer,
        audiences=(issuer.audience,),
        algorithms=("RS256",),
        groups_claim="groups",
        leeway_seconds=0,
        keys=StaticKeys(issuer),
    )
    return JwtVerifier([policy], {}, cache_size=cache_size)


def _verify_all(loop: asyncio.AbstractEventLoop, v: JwtVerifier, tokens: list[str]) -> None:
    async def run() -> None:
        for token in tokens:
            await v.verify(token)

    loop.run_until_complete(run())


def test_jwt_cached(
    benchmark: BenchmarkFixture, issuer: DevIssuer, loop: asyncio.AbstractEventLoop
) -> None:
    tokens = [issuer.mint(USER, GROUPS)] * BATCH
    v = verifier(issuer, 50_000)
    _verify_all(loop, v, tokens[:1])
    benchmark.pedantic(_verify_all, args=(loop, v, tokens), rounds=20, warmup_rounds=1)
    benchmark.extra_info["per_verify_us"] = round(median_seconds(benchmark) / BATCH * 1e6, 2)


def test_jwt_uncached(
    benchmark: BenchmarkFixture, issuer: DevIssuer, loop: asyncio.AbstractEventLoop
) -> None:
    # Distinct tokens and a verifier that keeps none: every call checks a signature.
    tokens = [issuer.mint(f"user{n}@example.com", GROUPS) for n in range(BATCH // 5)]
    v = verifier(issuer, 0)
    cycle = itertools.cycle([tokens])
    benchmark.pedantic(lambda: _verify_all(loop, v, next(cycle)), rounds=10, warmup_rounds=1)
    benchmark.extra_info["per_verify_us"] = round(median_seconds(benchmark) / len(tokens) * 1e6, 2)
