"""`sidecar serve` runs on uvloop unless told otherwise, and a bad choice is refused."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop

from sidecar import event_loop


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_serve_runs_on_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert event_loop.loop_name() == "uvloop"
    assert issubclass(event_loop.run(_loop_type()), uvloop.Loop)


def test_the_stdlib_loop_is_chosen_by_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    loop_type = event_loop.run(_loop_type())
    assert not issubclass(loop_type, uvloop.Loop)
    assert issubclass(loop_type, asyncio.BaseEventLoop)


def test_an_unknown_loop_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="SIDECAR_EVENT_LOOP must be"):
        event_loop.loop_name({event_loop.ENV: "trio"})


def test_serve_refuses_an_unknown_loop_before_starting(tmp_path: Path) -> None:
    config = f"{tmp_path}/sidecar.yaml"
    with open(config, "w", encoding="utf-8") as f:
        f.write("store: sqlite:///never-created.db\n")
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "serve", "--config", config],
        env={**os.environ, event_loop.ENV: "trio"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "SIDECAR_EVENT_LOOP must be 'uvloop' or 'asyncio', not 'trio'" in result.stderr
