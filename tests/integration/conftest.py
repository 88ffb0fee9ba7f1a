"""Integration fixtures: a dev identity provider and the whole stack on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.config import demo_config as base_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    return DevIssuer.generate()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack")
    jwks = issuer.write_jwks(workdir / "jwks.json")
    config = base_config(issuer, str(jwks), f"sqlite:///{workdir}/sidecar.db")
    with running_stack(workdir, issuer, config) as running:
        yield running


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
