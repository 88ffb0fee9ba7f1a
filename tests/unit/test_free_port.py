"""devtools.procs.free_port: ports the tests' processes listen on."""

from __future__ import annotations

import socket
from pathlib import Path

from devtools.procs import LOOPBACK, free_port


def _ephemeral() -> range:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return range(int(low), int(high) + 1)


def test_ports_lie_outside_the_ephemeral_range_so_no_outgoing_connection_takes_one() -> None:
    ephemeral = _ephemeral()
    ports = [free_port() for _ in range(100)]
    assert not [p for p in ports if p in ephemeral]
    # Nor does a Redis Cluster node's bus port (+10000).
    assert not [p for p in ports if p + 10_000 in ephemeral]


def test_a_port_is_handed_out_once_and_is_bindable() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, ports[-1]))
