"""Redis instructions per budget decision, counted by valgrind's callgrind: immune to load.

    .venv/bin/python -m bench.redis_callgrind                     # this tree, bench policy
    .venv/bin/python -m bench.redis_callgrind --baseline 070a5e4  # and a commit's store
    .venv/bin/python -m bench.redis_callgrind --policy per-owner --shards 3
    .venv/bin/python -m bench.redis_callgrind --batch 16   # commits as the access log sends them

`bench.redis_cpu` reads Redis's own microseconds, which a machine shared with other work
moves by 10-40% between runs. This runs redis-server under callgrind instead, with
instrumentation off while the engine warms up (the same warmup and rolling-window fill as
`bench.redis_cpu`, 50 users for the bench policy and 1,000 for per-owner) and on for
`--decisions` decisions (reserve and commit each; `--batch N` charges them N at a time
through `charge_many`, as an access log batch does, and a store without it commits each).
The engine's clock stands still for the run, so no rolling window moves to its next slot
between warmup and measurement (it would, or not, depending on how long valgrind took). The
count of instructions the server executed for them is the same on every run, give or take
1-2%. It is every instruction of the process (reading and parsing the commands, the scripts,
the replies, the server's own timers), not time: a change that saves instructions but misses
caches more would look better here than it is. Needs `valgrind` on the PATH. Prints one JSON
object.

`--policy bench|per-owner` picks the policy of `bench.redis_cpu` (its rules, callers and
setup). `--shards 3` also runs the same decisions against a Redis Cluster of three
primaries, every node under callgrind and counted over the same decisions. It reports per
node the instructions, the instructions inside script commands (FCALL, EVALSHA: what
`bench.redis_cpu` times) and the commands per decision, and the node's share of the script
calls; the busiest node's instructions per decision and the sum over nodes; and
`cluster_3_over_one` = one Redis's instructions per decision / the busiest node's: how
many times the decisions per second of one Redis the cluster serves when every node has a
core and the busiest one sets the ceiling (`..._scripts_only`: the same from the scripts'
instructions). The timers' share is inflated: valgrind stretches the measured decisions
over seconds, and an idle cluster node counts about 4 million instructions (20,000 per
decision at 200) in that time, which the scripts-only figures leave out. The nodes run
with a 60 s cluster node timeout, so that a node slowed by valgrind is not marked failing.

`--baseline REF` runs the same (policy, shards) on git commit REF's store, scripts and
engine: this file and `bench/redis_cpu.py` (the decision setup) are copied into REF's
tree, so both sides run the same procedure. A commit whose store or benchmark helpers
these cannot drive (say, one without Redis Cluster support for `--shards 3`) fails with
the commit's error; run that baseline with fewer modes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
import structlog

from bench.redis_cpu import POLICIES, Run
from devtools.config import demo_key_env
from devtools.procs import free_port
from devtools.redis_cluster import start_redis_cluster

WARMUP = 400
# Under valgrind a node answers slowly: a short node timeout would have the others mark it
# failing, and starting and joining the nodes takes tens of seconds.
CLUSTER_NODE_TIMEOUT_MS = 60_000
CLUSTER_START_SECONDS = 300.0


async def decisions(
    url: str,
    stat_urls: list[str],
    policy: str,
    workdir: Path,
    count: int,
    measuring: Any,
    batch: int,
) -> list[dict[str, int]]:
    """Warm up, then run `count` decisions inside `measuring` (a context manager); the
    commands each of `stat_urls` ran for them."""
    # Time stands still for the engine: a rolling window moves to its next slot once a
    # minute, re-summing its slots on the next decision that touches it, and whether that
    # falls among the measured decisions would otherwise depend on how long valgrind took
    # to get there (per-owner: each measured caller was last seen in the warmup).
    now = time.time()
    run = Run(
        url, stat_urls, policy, workdir, policy, prefix="bench:", clock=lambda: now, batch=batch
    )
    # Half the warmup (at least one decision per user), every rolling window filled, the
    # other half: the measured decisions find the store as after a day of traffic.
    await run.setup(WARMUP // 2, steady=True)
    await run.decide_next(WARMUP // 2)
    await run.reset_stats()
    with measuring:
        await run.decide_next(count)
    stats = await run.command_stats()
    await run.close()
    return [
        {name: calls for name, (calls, _) in node.items() if name != "config|resetstat"}
        for node in stats
    ]


class _Instrumented:
    """Callgrind counting inside the `with` block only, in every one of `pids`."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._pids = [str(pid) for pid in pids]

    def _switch(self, state: str) -> None:
        for pid in self._pids:
            command = ["callgrind_control", "-i", state, pid]
            subprocess.run(command, check=True, capture_output=True)

    def __enter__(self) -> None:
        self._switch("on")

    def __exit__(self, *exc: object) -> None:
        self._switch("off")


def _callgrind(out: Path) -> list[str]:
    """The argv prefix running a program under callgrind, counting nothing until told."""
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--instr-atstart=no"]


# The commands that run a script: their inclusive instructions are the scripts' work, what
# `bench.redis_cpu` times as script usec.
_SCRIPT_COMMANDS = (
    "fcallCommand", "fcallroCommand", "evalCommand", "evalRoCommand", "evalShaCommand",
    "evalShaRoCommand",
)  # fmt: skip
_SCRIPT_CALLS = ("fcall", "fcall_ro", "eval", "eval_ro", "evalsha", "evalsha_ro")


def _instructions(out: Path) -> tuple[int, int | None]:
    """The instructions callgrind counted in its output file `out`: all of them, and those
    inside script commands (None if the binary's symbols do not name them)."""
    if not out.is_file():
        raise RuntimeError(f"callgrind wrote no {out} (did the server exit cleanly?)")
    summary = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"^([\d,]+) .*PROGRAM TOTALS", summary, re.MULTILINE)
    if match is None:
        raise RuntimeError("callgrind_annotate printed no total")
    names = "|".join(_SCRIPT_COMMANDS)
    scripts = re.findall(rf"^\s*([\d,]+) .*:(?:{names}) ", summary, re.MULTILINE)
    in_scripts = sum(int(n.replace(",", "")) for n in scripts) if scripts else None
    return int(match.group(1).replace(",", "")), in_scripts


def _per_decision(
    counted: tuple[int, int | None], commands: dict[str, int], count: int, scripts: bool
) -> dict[str, Any]:
    """Instructions (and, if `scripts`, those inside scripts) and commands per decision."""
    instructions, in_scripts = counted
    row: dict[str, Any] = {"instructions_per_decision": round(instructions / count)}
    if scripts:
        row["script_instructions_per_decision"] = (
            None if in_scripts is None else round(in_scripts / count)
        )
    row["commands_per_decision"] = {k: round(v / count, 1) for k, v in sorted(commands.items())}
    return row


def measure_one(
    policy: str, count: int, workdir: Path, scripts: bool, batch: int
) -> dict[str, Any]:
    """`count` decisions on one redis-server under callgrind."""
    port = free_port()
    out = workdir / "callgrind.out"
    server = subprocess.Popen(
        [*_callgrind(out), "redis-server", "--save", "", "--appendonly", "no",
         "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        admin = redis.Redis(port=port)
        for _ in range(600):  # valgrind starts slowly
            try:
                if admin.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.1)
        url = f"redis://127.0.0.1:{port}/0"
        [commands] = asyncio.run(
            decisions(url, [url], policy, workdir, count, _Instrumented([server.pid]), batch)
        )
        admin.shutdown(nosave=True)  # callgrind writes its counts as the server exits
        server.wait(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return {"decisions": count, **_per_decision(_instructions(out), commands, count, scripts)}


def measure_cluster(
    policy: str, count: int, shards: int, workdir: Path, batch: int
) -> dict[str, Any]:
    """`count` decisions on a Redis Cluster of `shards` primaries, each under callgrind."""
    # valgrind replaces %p with the node's process id: one file per node.
    prefix = _callgrind(workdir / "callgrind.%p.out")
    with start_redis_cluster(
        workdir / "cluster",
        shards,
        node_timeout_ms=CLUSTER_NODE_TIMEOUT_MS,
        timeout=CLUSTER_START_SECONDS,
        argv_prefix=prefix,
    ) as cluster:
        pids = [process.pid for process in cluster.processes]
        commands = asyncio.run(
            decisions(
                cluster.url, cluster.node_urls(), policy, workdir, count, _Instrumented(pids), batch
            )
        )
        for port, process in zip(cluster.ports, cluster.processes, strict=True):
            admin = redis.Redis(port=port)
            admin.shutdown(nosave=True)  # callgrind writes its counts as the node exits
            admin.close()
            process.stop(timeout=120)
    script_calls = [sum(node.get(name, 0) for name in _SCRIPT_CALLS) for node in commands]
    nodes = [
        {
            **_per_decision(_instructions(workdir / f"callgrind.{pid}.out"), node, count, True),
            # Which part of the budget scripts' calls this node served.
            "share_of_script_calls": round(calls / max(sum(script_calls), 1), 3),
        }
        for pid, node, calls in zip(pids, commands, script_calls, strict=True)
    ]
    # Busiest first: which port (and so which slot range) a node got varies between runs.
    nodes.sort(key=lambda node: -node["instructions_per_decision"])
    return {
        "decisions": count,
        "per_node": nodes,
        "busiest_node_instructions_per_decision": nodes[0]["instructions_per_decision"],
        "sum_instructions_per_decision": sum(n["instructions_per_decision"] for n in nodes),
    }


def measure(policy: str, shards: int, count: int, batch: int) -> dict[str, Any]:
    """One Redis and, with `shards` > 1, a cluster of that many primaries; the ratio."""
    os.environ.update(demo_key_env())
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    with tempfile.TemporaryDirectory() as tmp:
        # One Redis alone prints what it always has; next to a cluster, its scripts' share.
        result = measure_one(policy, count, Path(tmp), shards > 1, batch)
    if shards > 1:
        with tempfile.TemporaryDirectory() as tmp:
            cluster = measure_cluster(policy, count, shards, Path(tmp), batch)
        result[f"cluster_{shards}_primaries"] = cluster
        # The store's capacity from CPU work: the busiest node sets the cluster's ceiling.
        result[f"cluster_{shards}_over_one"] = round(
            result["instructions_per_decision"] / cluster["busiest_node_instructions_per_decision"],
            3,
        )
        # The same from the scripts' instructions only, as `bench.redis_cpu` times them.
        busiest_scripts = max(
            (n["script_instructions_per_decision"] or 0 for n in cluster["per_node"]), default=0
        )
        one_scripts = result["script_instructions_per_decision"]
        result[f"cluster_{shards}_over_one_scripts_only"] = (
            round(one_scripts / busiest_scripts, 3) if one_scripts and busiest_scripts else None
        )
    return result


def baseline(ref: str, policy: str, shards: int, count: int, batch: int) -> dict[str, Any]:
    """The same count on git commit `ref`'s store, scripts and engine, in a subprocess
    importing that tree (with this file, this tree's decision setup and devtools, which
    older commits lack or have in other shapes)."""
    root = Path(__file__).resolve().parent.parent
    # Here, not at the top: this module also runs inside older trees, which lack it.
    from bench.alternate import extract_tree

    with tempfile.TemporaryDirectory() as tmp:
        extract_tree(ref, tmp)
        for name in ("redis_callgrind.py", "redis_cpu.py"):
            shutil.copy(Path(__file__).with_name(name), Path(tmp, "bench", name))
        argv = ["--decisions", str(count), "--policy", policy, "--shards", str(shards)]
        argv += ["--batch", str(batch)]
        done = subprocess.run(
            [sys.executable, "-m", "bench.redis_callgrind", *argv],
            cwd=tmp,
            env={**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{root}"},
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise SystemExit(
            f"callgrind run of {ref} ({' '.join(argv)}) failed; that commit's store or "
            f"benchmark helpers may not support this mode:\n{done.stderr[-2000:]}"
        )
    old: dict[str, Any] = json.loads(done.stdout)["now"]
    return old


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--decisions", type=int, default=200)
    parser.add_argument("--policy", choices=sorted(POLICIES), default="bench")
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        help="1: one Redis; 3 or more: also a Redis Cluster of that many primaries",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="charge requests this many at a time (`charge_many`, as an access log batch "
        "does); 1: commit each right after its check",
    )
    parser.add_argument("--baseline", metavar="REF", help="also count git commit REF's store")
    args = parser.parse_args(argv)
    if args.shards == 2 or args.shards < 1:
        parser.error("--shards: 1, or 3 or more (a Redis Cluster needs three primaries)")
    result: dict[str, Any] = {
        "policy": args.policy,
        "batch": args.batch,
        "now": measure(args.policy, args.shards, args.decisions, args.batch),
    }
    if args.baseline:
        old = baseline(args.baseline, args.policy, args.shards, args.decisions, args.batch)
        result["baseline"] = {"ref": args.baseline, **old}
        result["now_over_baseline"] = round(
            result["now"]["instructions_per_decision"] / old["instructions_per_decision"], 3
        )
        if args.shards > 1:
            busiest = "busiest_node_instructions_per_decision"
            cluster = f"cluster_{args.shards}_primaries"
            result["busiest_node_now_over_baseline"] = round(
                result["now"][cluster][busiest] / old[cluster][busiest], 3
            )
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
