"""The sidecar's instructions per streamed request, by chunks per answer, counted by callgrind.

Issue 14's target "sidecar CPU per streamed request grows by at most 10% from 1 to 64
chunks" cannot be read off `bench.stream_rows --rate`: on a shared 2-core machine the
sidecar's CPU per request moves by 20% from one row to the next at a fixed rate. This runs
the same path (Envoy as `sidecar envoy-config` prints it, the Check, the metering Lua filter
and the access log, a streaming upstream, the benchmark policy on SQLite) with the sidecar
under valgrind's callgrind, and counts the instructions the sidecar process executes:

- per phase, instrumentation on: `--requests` streamed requests at `--rate` a second (open
  loop, each read to its end by the client), then `--settle` seconds for their records to
  arrive and be charged; the ledger is then checked to hold every one at its usage. At a
  fixed rate each of Envoy's access log flushes (50 ms) carries as many records whatever the
  chunk count; one request after another would not, and a 64-chunk answer would then pay
  alone what shorter ones share;
- an idle phase of the same length with no request (the sidecar's own timers: settle
  passes, watchers, the load shedder), subtracted pro rata of wall time;
- phases alternate 1 and 64 chunks (`--chunks`), `--rounds` times.

Instructions are not time (a change that saves instructions but misses caches more looks
better here than it is), but they do not move with the machine's load: the same phase
counts the same within 1-2%. Needs `valgrind` on the PATH; the sidecar starts in about a
minute under it. Prints one JSON object.

    .venv/bin/python -m bench.chunk_cpu [--chunks 1 64] [--rounds 3] [--requests 150]
        [--rate 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from statistics import median

import httpx
import yaml

from bench import callgrind, sse_upstream
from bench.policy import GROUPS, PATH, bench_config
from bench.sse_upstream import PROMPT_TOKENS
from bench.stream_rows import STREAM_BODY, _envoy_config, _ledger
from devtools.config import demo_key_env
from devtools.keys import DevIssuer
from devtools.procs import LOOPBACK, ManagedProcess, free_port, start_envoy
from devtools.stack import ADMIN_TOKEN, serve_argv, wait_ready

USERS = 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=20.0, help="requests a second")
    args = parser.parse_args(argv)

    issuer = DevIssuer.generate()
    tokens = [issuer.mint(f"user{i}@example.com", GROUPS, ttl=6 * 3600) for i in range(USERS)]
    with tempfile.TemporaryDirectory(prefix="bench-chunk-cpu-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        jwks = issuer.write_jwks(workdir / "jwks.json")
        _, upstream_port = sse_upstream.start(stack, workdir)
        grpc_port, http_port = free_port(), free_port()
        config = bench_config(issuer, str(jwks), f"sqlite:///{workdir}/product.db")
        (workdir / "product.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        out = workdir / "callgrind.out"
        sidecar = stack.enter_context(
            ManagedProcess(
                "product",
                [
                    *callgrind.argv(out),
                    *serve_argv(workdir / "product.yaml", grpc_port, http_port, 1),
                ],
                workdir,
                env={**os.environ, **demo_key_env(), "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN},
                cwd=workdir,
            ).start()
        )
        api = f"http://{LOOPBACK}:{http_port}"
        wait_ready(api, sidecar, timeout=600)
        assert sidecar.pid is not None
        listen, admin = free_port(), free_port()
        envoy, _ = start_envoy(
            workdir,
            _envoy_config(listen, admin, grpc_port, upstream_port, False),
            base_id=listen,
        )
        stack.enter_context(envoy)
        url = f"http://{LOOPBACK}:{listen}{PATH}"
        client = stack.enter_context(
            httpx.Client(timeout=60, limits=httpx.Limits(max_connections=32))
        )

        def one(chunks: int, i: int) -> None:
            headers = {
                "content-type": "application/json",
                "cf-access-jwt-assertion": tokens[i % USERS],
                "x-bench-chunks": str(chunks),
            }
            with client.stream("POST", url, content=STREAM_BODY, headers=headers) as answer:
                answer.read()
                if answer.status_code != 200:
                    raise RuntimeError(f"status {answer.status_code}: {answer.text[:200]}")

        def send(chunks: int, count: int) -> None:
            """`count` requests started at `--rate` a second (open loop), each read to its
            end: the same number of calls end in each of Envoy's access log flushes whatever
            the chunk count, as at any fixed load."""
            with ThreadPoolExecutor(max_workers=32) as pool:
                started = time.monotonic()
                calls = []
                for i in range(count):
                    due = started + i / args.rate
                    time.sleep(max(0.0, due - time.monotonic()))  # pacing the load
                    calls.append(pool.submit(one, chunks, i))
                for call in calls:
                    call.result()

        # Warm-up, not counted: first JWT checks, plans, imports along the path.
        for chunks in args.chunks:
            send(chunks, 20)
        time.sleep(args.settle)
        rows: dict[str, list[dict[str, float]]] = {str(c): [] for c in args.chunks}
        for rnd in range(args.rounds):
            for chunks in args.chunks:
                before = _ledger(api)

                def phase(c: int = chunks) -> None:
                    send(c, args.requests)
                    time.sleep(args.settle)  # the phase's length: records arrive, charges land

                counted, elapsed = callgrind.counted(sidecar.pid, out, phase)
                idle, idle_elapsed = callgrind.counted(sidecar.pid, out, callgrind.idle(elapsed))
                after = _ledger(api)
                charged = after["requests"] - before["requests"]
                exact = (
                    charged == args.requests
                    and after["input_tokens"] - before["input_tokens"]
                    == args.requests * PROMPT_TOKENS
                    and after["output_tokens"] - before["output_tokens"] == args.requests * chunks
                )
                per_request = (counted - idle * elapsed / idle_elapsed) / args.requests
                row = {
                    "round": rnd,
                    "instructions_per_request": round(per_request),
                    "instructions_phase": counted,
                    "instructions_idle_same_time": round(idle * elapsed / idle_elapsed),
                    "seconds": round(elapsed, 2),
                    "ledger_exact": exact,
                }
                rows[str(chunks)].append(row)
                print(f"chunks {chunks:3} round {rnd}: {row}", file=sys.stderr, flush=True)
        medians = {c: median(r["instructions_per_request"] for r in rs) for c, rs in rows.items()}
        first, last = str(args.chunks[0]), str(args.chunks[-1])
        print(
            json.dumps(
                {
                    "requests_per_phase": args.requests,
                    "rows": rows,
                    "median_instructions_per_request": medians,
                    "growth": round(medians[last] / medians[first] - 1, 4),
                    "ledger_exact": all(r["ledger_exact"] for rs in rows.values() for r in rs),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
