"""A local Redis Cluster can run every node under a wrapper program (a benchmark runs them
under valgrind): the wrapper keeps the node's process id, so the cluster still stops and
measures the node it started."""

from __future__ import annotations

import os
from pathlib import Path

import redis

from devtools.redis_cluster import start_redis_cluster


def _niceness(pid: int) -> int:
    # /proc/<pid>/stat: the 19th field, counted after the parenthesised command name.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def test_argv_prefix_runs_every_node_under_the_wrapper_in_its_own_process(
    tmp_path: Path,
) -> None:
    # `nice` lowers the priority and then becomes redis-server: the process id stays.
    expected = min(os.nice(0) + 3, 19)
    with start_redis_cluster(tmp_path, argv_prefix=["nice", "-n", "3"]) as cluster:
        for port, process in zip(cluster.ports, cluster.processes, strict=True):
            assert _niceness(process.pid) == expected
            node = redis.Redis(port=port, decode_responses=True)
            try:
                assert node.info("server")["process_id"] == process.pid
                assert node.cluster("info")["cluster_state"] == "ok"
            finally:
                node.close()
