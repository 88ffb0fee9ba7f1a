"""A running `sidecar serve` with `overload.batch_helper_threads: always`: once calls have
gone through Envoy, every thread of the process but the event loop's runs as SCHED_BATCH
(gRPC's pools included, which start under load), and a reload to the default, `never`,
puts them back."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack
from tests.integration.test_reload import wait_for


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("helper-threads")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    config = demo_config(
        issuer, jwks, f"sqlite:///{workdir}/s.db", overload={"batch_helper_threads": "always"}
    )
    with running_stack(workdir, issuer, config) as running:
        yield running


def policies(pid: int) -> dict[int, int]:
    """Each thread's scheduling policy, by tid."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(name)] = os.sched_getscheduler(int(name))
        except ProcessLookupError:
            continue
    return out


def helpers_are(pid: int, want: int) -> bool:
    threads = policies(pid)
    return threads[pid] == os.SCHED_OTHER and all(
        p == want for tid, p in threads.items() if tid != pid
    )


def test_helpers_run_as_batch_and_a_reload_puts_them_back(stack: Stack, issuer: DevIssuer) -> None:
    pid = stack.sidecars[0].pid
    assert pid is not None
    token = issuer.mint("alice@example.com", ["eng"])
    for _ in range(5):
        response = httpx.post(
            stack.envoy_url + "/openai/v1/chat/completions",
            headers={"authorization": f"Bearer {token}"},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            timeout=20,
        )
        assert response.status_code == 200
    # gRPC's threads are several: they all run, and none is the loop's.
    assert len(policies(pid)) > 3
    wait_for(lambda: helpers_are(pid, os.SCHED_BATCH), 10)

    # The setting removed: the default, `never`.
    config = {key: value for key, value in stack_config(stack).items() if key != "overload"}
    stack.write_config(config)
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: helpers_are(pid, os.SCHED_OTHER), 10)


def stack_config(stack: Stack) -> dict[str, Any]:
    import yaml

    loaded: dict[str, Any] = yaml.safe_load(stack.config_path.read_text())
    return loaded
