"""Start a real Redis Cluster of a few primaries on loopback ports, for tests and benchmarks.

Each primary is its own `redis-server --cluster-enabled yes`; `redis-cli --cluster create`
splits the 16,384 hash slots between them. By default no replicas: a primary that stops
takes its slots down with it, and `cluster-require-full-coverage no` keeps the others
serving theirs. With `replicas=1` each primary gets one, which takes over when it fails.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devtools.procs import (
    LOOPBACK,
    ManagedProcess,
    _wait_redis_pong,
    free_port,
    redis_binary,
    wait_for_port,
)

# Redis Cluster nodes talk to each other on their port + 10000.
_BUS_OFFSET = 10000


@dataclass
class LocalCluster:
    """The processes and ports of a running local cluster; `stop()` ends them all."""

    processes: list[ManagedProcess] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    # replica_ports[i] (run by replica_processes[i]) replicates ports[i].
    replica_processes: list[ManagedProcess] = field(default_factory=list)
    replica_ports: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The store URL naming every primary (any one of them would do to start)."""
        return "redis+cluster://" + ",".join(f"{LOOPBACK}:{p}" for p in self.ports) + "/"

    def node_urls(self) -> list[str]:
        return [f"redis://{LOOPBACK}:{p}/0" for p in self.ports]

    def stop(self) -> None:
        for process in [*self.processes, *self.replica_processes]:
            process.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_port() -> int:
    # The node's port and its bus port (+10000) must both be free.
    while True:
        port = free_port()
        if port + _BUS_OFFSET > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port + _BUS_OFFSET))
            except OSError:
                continue
        return port


def _redis_cli() -> str:
    path = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    if not Path(path).is_file():
        raise FileNotFoundError(
            "redis-cli not found: the cluster tests need it to create "
            "the cluster (Debian: `apt-get install redis-tools`)"
        )
    return path


def _cli(port: int, *args: str, timeout: float = 30.0) -> str:
    done = subprocess.run(
        [_redis_cli(), "-h", LOOPBACK, "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli {' '.join(args)}: {done.stdout}{done.stderr}")
    return done.stdout


def start_redis_cluster(
    tmp_dir: Path,
    primaries: int = 3,
    *,
    replicas: int = 0,
    node_timeout_ms: int = 1000,
    timeout: float = 30.0,
    argv_prefix: Sequence[str] = (),
) -> LocalCluster:
    """Run `primaries` cluster-enabled redis-servers, join them, and wait until every node
    reports `cluster_state:ok` (and, with `replicas`, every replica is in sync).

    `argv_prefix` runs every node under a wrapper (e.g. `valgrind --tool=callgrind ...`):
    the wrapper must keep the node's process id. A slow wrapper wants a larger
    `node_timeout_ms` (or the nodes mark each other failing) and `timeout`."""
    cluster = LocalCluster()
    try:
        for _ in range(primaries * (1 + replicas)):
            port = _cluster_port()
            node_dir = Path(tmp_dir) / f"node-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            argv = [
                *argv_prefix, redis_binary(), "--save", "", "--appendonly", "no",
                "--bind", LOOPBACK, "--port", str(port), "--dir", str(node_dir),
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-require-full-coverage", "no",
            ]  # fmt: skip
            process = ManagedProcess(f"redis-cluster-{port}", argv, node_dir).start()
            cluster.processes.append(process)
            cluster.ports.append(port)
            wait_for_port(LOOPBACK, port, timeout, process=process)
            _wait_redis_pong(process, port, timeout)
        _cli(
            cluster.ports[0],
            "--cluster",
            "create",
            *(f"{LOOPBACK}:{p}" for p in cluster.ports),
            "--cluster-replicas",
            str(replicas),
            "--cluster-yes",
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        for port in cluster.ports:
            while "cluster_state:ok" not in _cli(port, "cluster", "info"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cluster node {port} never reported cluster_state:ok")
                time.sleep(0.1)
        if replicas:
            _sort_roles(cluster, replicas, deadline)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _sort_roles(cluster: LocalCluster, replicas: int, deadline: float) -> None:
    """Keep primaries in `ports`, and replicas (in sync) in `replica_ports`, in their
    primaries' order: redis-cli chose which node is which."""
    if replicas != 1:
        raise ValueError("one replica per primary is supported")
    # The first node learns of the others' roles by gossip: read its view until it has
    # every replica, each of a node it knows.
    while True:
        ids: dict[str, int] = {}
        primary_of: dict[int, str] = {}
        for line in _cli(cluster.ports[0], "cluster", "nodes").splitlines():
            node_id, address, flags, master, *_ = line.split()
            port = int(address.split("@")[0].rsplit(":", 1)[1])
            ids[node_id] = port
            if "slave" in flags.split(","):
                primary_of[port] = master
        masters = set(primary_of.values())
        if len(primary_of) * 2 == len(cluster.ports) == len(masters) * 2 and all(
            master in ids and ids[master] not in primary_of for master in masters
        ):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster never showed its replicas: {primary_of}")
        time.sleep(0.1)  # gossip between the nodes, another process's work
    process_of = dict(zip(cluster.ports, cluster.processes, strict=True))
    primaries = [p for p in cluster.ports if p not in primary_of]
    replica_of = {ids[master]: port for port, master in primary_of.items()}
    cluster.ports = primaries
    cluster.processes = [process_of[p] for p in primaries]
    cluster.replica_ports = [replica_of[p] for p in primaries]
    cluster.replica_processes = [process_of[p] for p in cluster.replica_ports]
    for port in cluster.replica_ports:
        while "master_link_status:up" not in _cli(port, "info", "replication"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {port} never caught up with its primary")
            time.sleep(0.1)
