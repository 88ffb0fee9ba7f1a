"""Redis instructions per budget decision, counted by valgrind's callgrind: immune to load.

    .venv/bin/python -m bench.redis_callgrind                     # this tree, bench policy
    .venv/bin/python -m bench.redis_callgrind --baseline 070a5e4  # and a commit's store

`bench.redis_cpu` reads Redis's own microseconds, which a machine shared with other work
moves by 10-40% between runs. This runs redis-server under callgrind instead, with
instrumentation off while the engine warms up (the same warmup and rolling-window fill as
`bench.redis_cpu`, bench policy, 50 users) and on for `--decisions` decisions (reserve and
commit each): the count of instructions the server executed for them is the same on every
run, give or take 1%. It is every instruction of the process (reading and parsing the
commands, the scripts, the replies), not time: a change that saves instructions but misses
caches more would look better here than it is. `--baseline REF` runs the same on git
commit REF's store and prints the ratio. Needs `valgrind` on the PATH. Prints one JSON
object.
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
from pathlib import Path
from typing import Any

import redis
import structlog

from bench.micro.test_engine_micro import make_engine
from bench.policy import BODY, PATH, bench_config
from bench.redis_cpu import Recorder, fill_rolling_windows
from devtools.config import demo_key_env
from devtools.keys import DevIssuer
from devtools.procs import free_port
from sidecar.config.loader import parse_config
from sidecar.config.ruleset import build_ruleset
from sidecar.model import RequestAttrs, TokenUsage
from sidecar.store.redis_store import RedisStore

USERS = 50
WARMUP = 400
COST = 1_500
USAGE = TokenUsage(input_tokens=20, output_tokens=40)


async def decisions(url: str, workdir: Path, count: int, measuring: Any) -> dict[str, int]:
    """Warm up, then run `count` decisions inside `measuring` (a context manager); the
    commands Redis ran for them."""
    issuer = DevIssuer.generate()
    jwks = issuer.write_jwks(workdir / "jwks.json")
    ruleset = build_ruleset(parse_config(bench_config(issuer, str(jwks), url)))
    store = RedisStore(url, prefix="bench:")
    recorder = Recorder(store)
    engine = make_engine(ruleset, recorder)
    tokens = [
        issuer.mint(f"user{i}@example.com", ["eng", "ml"], ttl=6 * 3600) for i in range(USERS)
    ]

    async def decide(n: int) -> None:
        headers = {"content-type": "application/json", "cf-access-jwt-assertion": tokens[n % USERS]}
        decision = await engine.check(RequestAttrs("POST", PATH, headers, BODY, f"r-{n}"))
        if not decision.allowed:
            raise RuntimeError(f"refused: {decision.body!r}")
        result = await store.commit(decision.request_id, COST, USAGE, time.time())
        if result.status != "committed":
            raise RuntimeError(f"commit: {result}")

    for n in range(WARMUP // 2):
        await decide(n)
    await fill_rolling_windows(store, recorder.buckets)
    for n in range(WARMUP // 2, WARMUP):
        await decide(n)
    admin = redis.Redis.from_url(url)
    admin.config_resetstat()
    with measuring:
        for n in range(WARMUP, WARMUP + count):
            await decide(n)
    stats = admin.info("commandstats")
    admin.close()
    await store.close()
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name != "cmdstat_config|resetstat"
    }


class _Instrumented:
    """Callgrind counting inside the `with` block only."""

    def __init__(self, pid: int) -> None:
        self._pid = str(pid)

    def _switch(self, state: str) -> None:
        command = ["callgrind_control", "-i", state, self._pid]
        subprocess.run(command, check=True, capture_output=True)

    def __enter__(self) -> None:
        self._switch("on")

    def __exit__(self, *exc: object) -> None:
        self._switch("off")


def measure(count: int) -> dict[str, Any]:
    os.environ.update(demo_key_env())
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        port = free_port()
        out = workdir / "callgrind.out"
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--instr-atstart=no",
             "redis-server", "--save", "", "--appendonly", "no", "--bind", "127.0.0.1",
             "--port", str(port), "--dir", tmp],
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
            commands = asyncio.run(decisions(url, workdir, count, _Instrumented(server.pid)))
            admin.shutdown(nosave=True)  # callgrind writes its counts as the server exits
            server.wait(timeout=120)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        summary = subprocess.run(
            ["callgrind_annotate", str(out)], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"^([\d,]+) .*PROGRAM TOTALS", summary, re.MULTILINE)
    if match is None:
        raise RuntimeError("callgrind_annotate printed no total")
    instructions = int(match.group(1).replace(",", ""))
    return {
        "decisions": count,
        "instructions_per_decision": round(instructions / count),
        "commands_per_decision": {k: round(v / count, 1) for k, v in sorted(commands.items())},
    }


def baseline(ref: str, count: int) -> dict[str, Any]:
    """This count on git commit `ref`'s store and benchmark helpers, in a subprocess
    importing that tree (and this tree's devtools, which older commits lack)."""
    root = Path(__file__).resolve().parent.parent
    # Here, not at the top: this module also runs inside older trees, which lack it.
    from bench.alternate import extract_tree

    with tempfile.TemporaryDirectory() as tmp:
        extract_tree(ref, tmp)
        shutil.copy(Path(__file__), Path(tmp, "bench", "redis_callgrind.py"))
        done = subprocess.run(
            [sys.executable, "-m", "bench.redis_callgrind", "--decisions", str(count)],
            cwd=tmp,
            env={**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{root}"},
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise SystemExit(f"callgrind run of {ref} failed:\n{done.stderr[-2000:]}")
    old: dict[str, Any] = json.loads(done.stdout)["now"]
    return old


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--decisions", type=int, default=200)
    parser.add_argument("--baseline", metavar="REF", help="also count git commit REF's store")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"policy": "bench", "now": measure(args.decisions)}
    if args.baseline:
        old = baseline(args.baseline, args.decisions)
        result["baseline"] = {"ref": args.baseline, **old}
        result["now_over_baseline"] = round(
            result["now"]["instructions_per_decision"] / old["instructions_per_decision"], 3
        )
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
