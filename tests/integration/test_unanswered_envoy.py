"""Clients that hang up while their Check waits in the sidecar, through Envoy: the calls
never reach the provider, so none may be charged, nor left holding a reservation that would
expire into its estimate (sidecar/envoy/unanswered.py)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack
from tests.support.ledger import eventually, ledger_row

CALLS = 60
BURSTS = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("unanswered")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    config = demo_config(issuer, jwks, f"sqlite:///{workdir}/s.db")
    with running_stack(workdir, issuer, config) as running:
        yield running


def _metric(stack: Stack, name: str) -> float:
    metrics = httpx.get(stack.admin_url + "/metrics", timeout=10).text
    return sum(float(row.split()[-1]) for row in metrics.splitlines() if row.startswith(name + " "))


def _burst_of_hang_ups(stack: Stack, token: str) -> None:
    """CALLS requests sent at once on connections of their own, each closed a few
    milliseconds later: some while Envoy waits for the Check, some with the Check already in
    the sidecar's queue."""
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hang up"}]}
    )
    request = (
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        f"content-type: application/json\r\ncf-access-jwt-assertion: {token}\r\n"
        f"content-length: {len(body)}\r\n\r\n{body}"
    ).encode()
    url = urlsplit(stack.envoy_url)
    assert url.hostname is not None and url.port is not None
    sockets = [socket.create_connection((url.hostname, url.port)) for _ in range(CALLS)]
    for sock in sockets:
        sock.sendall(request)
    time.sleep(0.004)  # the hang-up itself, not a wait for anything
    for sock in sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()


def _poll(probe: Callable[[], bool], seconds: float) -> bool:
    """Whether `probe` comes true within `seconds` (the sidecar is another process)."""
    deadline = time.monotonic() + seconds
    while not probe():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_calls_whose_client_left_during_the_check_cost_nothing_and_hold_nothing(
    stack: Stack, issuer: DevIssuer
) -> None:
    email = "hang-up@example.com"
    token = issuer.mint(email)
    # Whether a Check is admitted by the time its client leaves is up to timing: burst
    # until the sidecar has released at least one such call, matched by what Envoy logged.
    for _ in range(BURSTS):
        _burst_of_hang_ups(stack, token)
        if _poll(lambda: _metric(stack, "sidecar_unanswered_calls_total") >= 1, 3):
            break
    else:
        pytest.fail(f"no Check was admitted for a client that left, in {BURSTS} bursts")
    released = _metric(stack, "sidecar_unanswered_calls_total")

    # Every admitted call is accounted for: none is left to expire into its estimate.
    assert _poll(lambda: _metric(stack, "sidecar_reservations_open") == 0, 10), (
        "reservations were left open"
    )
    # The released calls are on the ledger at $0, as calls that never reached the provider.
    row = eventually(
        lambda: r if (r := ledger_row(stack, email)) and int(r["errors"]) >= released else None,
        timeout=10,
        what="the released calls on the ledger",
    )
    assert int(row["requests"]) >= released
