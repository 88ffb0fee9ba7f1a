"""Redis µs per reserve and per commit script, replayed without a client in the way.

    .venv/bin/python -m bench.redis_replay                      # bench policy
    .venv/bin/python -m bench.redis_replay --policy per-owner --baseline 5fc307d

`bench.redis_cpu` measures whole decisions through the engine, and on a busy machine its
rounds differ by 10-30%. This replays instead: the engine decides once (after the same
warmup and rolling-window fill as `bench.redis_cpu`, on a fresh redis-server) while the
store's script calls are captured; then that reserve and that commit are sent again, each
`--calls` times with fresh request ids, pipelined, and `INFO commandstats` gives the EVALSHA
(or FCALL: budget functions) microseconds per call. Of `--rounds` rounds the fastest
counts. Same buckets every time, so the figures are lower than `bench.redis_cpu`'s (warm
hashes) but repeat within about 1 µs, which is what a before/after of a script change
needs. `--baseline REF` runs the same
replay on git commit REF's store (REF must have `bench.redis_cpu` with the per-owner
policy: f93df6c or later) in the same invocation. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import redis
import structlog

from bench import redis_cpu
from devtools.config import demo_key_env
from devtools.procs import start_redis
from sidecar.store import redis_script

try:
    from sidecar.store import redis_functions
except ImportError:  # a baseline from before the budget scripts were functions
    redis_functions = None  # type: ignore[assignment]

# ("eval", script source | "fcall", function name), keys, args
Call = tuple[tuple[str, str], list[str], list[bytes]]


def _encoded(arg: Any) -> bytes:
    """An argument as Redis receives it (a record is bytes, other arguments text)."""
    return arg if isinstance(arg, bytes) else str(arg).encode()


async def capture(url: str, policy: str, workdir: Path) -> list[Call]:
    """The script or function calls of one decision (reserve, then commit) after a
    warmed-up store. A store of a commit before functions runs its budget scripts as
    `LuaScript`s; one after, as `LuaFunction`s (both are spied on, whichever exists)."""
    captured: list[Call] = []
    spied: list[tuple[Any, Any]] = []

    def spy_on(cls: Any, kind: str, attribute: str) -> None:
        original = cls.__call__

        async def spy(self: Any, keys: Any, args: Any = ()) -> Any:
            what = (kind, getattr(self, attribute))
            captured.append((what, [str(k) for k in keys], [_encoded(a) for a in args]))
            return await original(self, keys, args)

        spied.append((cls, original))
        cls.__call__ = spy

    run = redis_cpu.Run(url, [url], policy, workdir, "replay")
    await run.setup(500, True)
    spy_on(redis_script.LuaScript, "eval", "source")
    if redis_functions is not None:
        spy_on(redis_functions.LuaFunction, "fcall", "name")
    try:
        await run.decide(run.next_id)
    finally:
        for cls, original in spied:
            cls.__call__ = original
        await run.close()
    return captured


def replay(port: int, calls: list[Call], rounds: int, per_round: int) -> dict[str, float]:
    """Fastest µs per call of each captured script, replayed with fresh request ids."""
    client = redis.Redis(port=port, decode_responses=True)
    # The reserve's request id ends its record's key ("...:r:<id>"), and the id appears in
    # its arguments (alone, or in the record): replaced wherever it is, by a random-looking
    # id of the same length (a record gives its strings' lengths; Lua hashes a long string from a
    # sample of its bytes, so ids alike but for a counter would collide where real ids do
    # not).
    request_id = calls[0][1][0].rsplit(":r:", 1)[1]
    best = {"reserve": float("inf"), "commit": float("inf")}
    for n in range(rounds):
        for name, ((kind, what), keys, args) in zip(best, calls[:2], strict=True):
            sha = client.script_load(what) if kind == "eval" else ""
            command = "fcall" if kind == "fcall" else "evalsha"
            client.config_resetstat()
            pipe = client.pipeline(transaction=False)
            for i in range(per_round):
                # The commit of call i finds the record the reserve of call i wrote.
                fresh = (hashlib.sha256(f"{n}-{i}".encode()).hexdigest())[: len(request_id)]
                keys_and_args: list[str | bytes] = [
                    *[k.replace(request_id, fresh) for k in keys],
                    *[a.replace(request_id.encode(), fresh.encode()) for a in args],
                ]
                if kind == "fcall":
                    pipe.fcall(what, len(keys), *keys_and_args)
                else:
                    pipe.evalsha(sha, len(keys), *keys_and_args)
            pipe.execute()
            stat = client.info("commandstats")[f"cmdstat_{command}"]
            best[name] = min(best[name], stat["usec"] / stat["calls"])
    client.close()
    return {name: round(usec, 2) for name, usec in best.items()}


def measure(policy: str, rounds: int, per_round: int) -> dict[str, float]:
    os.environ.update(demo_key_env())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        proc, port = start_redis(workdir / "redis")
        with proc:
            calls = asyncio.run(capture(f"redis://127.0.0.1:{port}/0", policy, workdir))
            if len(calls) != 2:
                raise RuntimeError(f"expected one reserve and one commit, got {len(calls)}")
            usec = replay(port, calls, rounds, per_round)
    return {**usec, "decision": round(usec["reserve"] + usec["commit"], 2)}


def baseline(ref: str, argv: list[str]) -> dict[str, float]:
    """This replay on git commit `ref`'s store, in a subprocess importing that tree."""
    # Here, not at the top: this module also runs inside older trees, which lack it.
    from bench.alternate import extract_tree

    with tempfile.TemporaryDirectory() as tmp:
        extract_tree(ref, tmp, ("sidecar", "bench", "devtools", "tests/support"))
        shutil.copy(Path(__file__), Path(tmp, "bench", "redis_replay.py"))
        done = subprocess.run(
            [sys.executable, "-m", "bench.redis_replay", *argv],
            cwd=tmp,
            env={**os.environ, "PYTHONPATH": tmp},
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise SystemExit(
            f"replay of {ref} failed (it needs bench.redis_cpu with the per-owner "
            f"policy):\n{done.stderr[-2000:]}"
        )
    old: dict[str, float] = json.loads(done.stdout)["now"]
    return old


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--policy", choices=sorted(redis_cpu.POLICIES), default="bench")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000, help="per script and round")
    parser.add_argument(
        "--baseline", metavar="REF", help="also replay git commit REF's store, for a ratio"
    )
    args = parser.parse_args(argv)
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    common = ["--policy", args.policy, "--rounds", str(args.rounds), "--calls", str(args.calls)]
    result: dict[str, Any] = {
        "policy": args.policy,
        "now": measure(args.policy, args.rounds, args.calls),
    }
    if args.baseline:
        old = baseline(args.baseline, common)
        result["baseline"] = {"ref": args.baseline, **old}
        result["now_over_baseline"] = round(result["now"]["decision"] / old["decision"], 2)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
