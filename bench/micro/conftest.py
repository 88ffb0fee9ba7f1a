"""Shared fixtures for the microbenchmarks: the benchmark policy compiled, a dev issuer, its
JWKS file, and an event loop to drive async code from pytest-benchmark's sync callables."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from bench.policy import bench_config
from devtools.config import demo_key_env
from devtools.keys import DevIssuer
from sidecar.config.loader import parse_config
from sidecar.config.ruleset import RuleSet, build_ruleset
from sidecar.log import configure


@pytest.fixture(scope="session", autouse=True)
def provider_keys() -> None:
    """The benchmark policy's providers hold the demo keys, read from the environment."""
    os.environ.update(demo_key_env())


@pytest.fixture(scope="session", autouse=True)
def server_logging() -> Iterator[None]:
    """Log exactly as `sidecar serve` does (one JSON decision line per check), into
    /dev/null: the cost of rendering the line is part of a decision, the terminal is not."""
    configure("info")
    with open(os.devnull, "w") as sink:
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sink))
        yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def issuer() -> DevIssuer:
    return DevIssuer.generate()


@pytest.fixture(scope="session")
def jwks_path(issuer: DevIssuer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issuer.write_jwks(tmp_path_factory.mktemp("jwks") / "jwks.json")


@pytest.fixture(scope="session")
def ruleset(issuer: DevIssuer, jwks_path: Path) -> RuleSet:
    return build_ruleset(parse_config(bench_config(issuer, str(jwks_path), "sqlite:///unused.db")))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
