"""Streamed answers through the whole product path against the no-op floor, same upstream.

Two Envoys in front of one streaming upstream (bench/sse_upstream.py): one with the no-op
Python ext_authz (the floor), one with what `sidecar envoy-config` prints pointing at a
SQLite sidecar with the benchmark policy (Check + metering). For 1, 16 and 64 chunks per
answer, the rows are measured alternately, round after round, with wrk (100 distinct users,
closed loop). Per row: throughput, its ratio to the floor of the same round, the backend
process's CPU per request (less what it spends idle), and, for the product row, ledger
exactness: every request the ledger holds was charged exactly its usage times the price
(the stream's usage chunk arrived), exactly its reservation (wrk cut the stream at the end
of the run after it reached the upstream) or nothing (cut before), and every answer wrk
completed was charged its usage. Each sidecar row also counts, from its Envoy's stats, the
Checks that failed at Envoy (its timeout: an allow Envoy never acted on) and the metering
records Envoy dropped: where a reservation left open (`left_open`) can have come from.

`--baseline DIR` adds a row: the sidecar of another source tree (say `git archive main |
tar -x -C DIR`), with the same policy and its own database, behind its own Envoy, measured in
the same rounds; each round gives the product's CPU per request as a ratio to it. Each
sidecar row also prints the CPU per request of its two busiest threads (the event loop's is
the one whose tid is the pid; the SQLite store's thread starts next).

Every row also prints where the machine's CPU went over it (bench/utilisation.py): cores
busy in all (the machine's, other users included), Envoy's, the backend's, the upstream's
and wrk's, and how busy the busiest event loop of the backend and of the upstream was (1.0
is a saturated loop), with wrk's mean latency: whether a row is CPU-bound or waits.

`--workers N` runs N backend processes in both rows: `sidecar serve --workers N` (SQLite
shared by the workers) and N no-op floors on one port (SO_REUSEPORT); both Envoys then cap
a sidecar connection at 2 streams so that they open several and the kernel spreads them.
`--client-usage` sends bodies that ask for the usage event themselves, so that Envoy's Lua
filter does no request-body insertion (and hides no event): that part of Envoy's CPU.

    .venv/bin/python -m bench.stream_rows [--rounds 3] [--seconds 8] [--connections 32]
        [--chunks 1 16 64] [--baseline DIR] [--workers N] [--client-usage]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from decimal import Decimal
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import yaml

from bench import sse_upstream
from bench.closed_loop import ensure_tools
from bench.cpu import busiest_threads, cpu_seconds, start_profile, thread_cpu
from bench.policy import BODY, GROUPS, MODEL, PATH, bench_config
from bench.sse_upstream import PROMPT_TOKENS
from bench.utilisation import Sample, event_loop_pids
from devtools.config import demo_key_env
from devtools.envoy_config import render_envoy_config
from devtools.keys import DevIssuer
from devtools.procs import LOOPBACK, ManagedProcess, free_port, start_envoy, wait_for_port
from devtools.stack import ADMIN_TOKEN, serve_argv, wait_ready
from sidecar.client.usage_report import dollars
from sidecar.config.loader import parse_config
from sidecar.config.ruleset import build_ruleset
from sidecar.envoy.attach import (
    CHECK_CLUSTER,
    DEFAULT_MAX_CHECKS,
    EXT_AUTHZ,
    METER,
    SIDECAR_CLUSTER,
    SIDECAR_FILTERS,
)
from sidecar.model import TokenUsage
from sidecar.pricing import (
    cost_micros,
    estimate_input_tokens,
    estimate_micros,
    requested_output_tokens,
)

CHUNKS = (1, 16, 64)
USERS = 100
STREAM_BODY = json.dumps({**json.loads(BODY), "stream": True}, separators=(",", ":"))
# The client asks for the usage event itself: the Check asks for no body change, so Envoy's
# Lua filter neither rewrites the request body nor hides the event from the client.
STREAM_BODY_WITH_USAGE = json.dumps(
    {**json.loads(STREAM_BODY), "stream_options": {"include_usage": True}}, separators=(",", ":")
)


def _envoy_config(
    listen: int,
    admin: int,
    grpc_port: int,
    upstream: int,
    floor: bool,
    workers: int = 1,
    lua: Path | None = None,
) -> dict[str, Any]:
    """The row's Envoy; `lua`: the metering filter's source instead of this tree's (a
    baseline row runs its own tree's, so that a change to the filter is measured too)."""
    config = render_envoy_config(
        listen_port=listen,
        admin_port=admin,
        sidecar_grpc=(LOOPBACK, grpc_port),
        provider_upstream=(LOOPBACK, upstream),
        max_checks=DEFAULT_MAX_CHECKS * workers,
    )
    if workers > 1:
        # Envoy keeps one HTTP/2 connection per worker thread to a cluster; the kernel
        # spreads connections, not requests, over processes sharing the port (README,
        # `sidecar serve --workers N`), so make Envoy open several.
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] in (SIDECAR_CLUSTER, CHECK_CLUSTER):
                cluster["typed_extension_protocol_options"][
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
                ]["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"] = 2
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    # The same for every row and only disk writes here: Envoy's own stdout access log goes.
    hcm["access_log"] = [
        e for e in hcm.get("access_log", []) if e["name"] != "envoy.access_loggers.stdout"
    ]
    if lua is not None and lua.is_file():
        for f in hcm["http_filters"]:
            if f["name"] == METER:
                f["typed_config"]["default_source_code"] = {"inline_string": lua.read_text()}
    if floor:
        hcm["http_filters"] = [
            f
            for f in hcm["http_filters"]
            if f["name"] not in SIDECAR_FILTERS or f["name"] == EXT_AUTHZ
        ]
        hcm["access_log"] = []
    return config


def _wrk_script(path: Path, tokens: list[str], chunks: int, body: str) -> Path:
    requests = ",\n".join(
        "  wrk.format('POST', nil, {['content-type']='application/json', "
        f"['cf-access-jwt-assertion']={json.dumps(t)}, ['x-bench-chunks']='{chunks}'}}, "
        f"{json.dumps(body)})"
        for t in tokens
    )
    path.write_text(
        f"""
local requests = nil
local n = 0
function request()
  if requests == nil then requests = {{
{requests}
  }} end
  n = n + 1
  return requests[(n % #requests) + 1]
end
function done(summary, latency, reqs)
  local e = summary.errors
  io.write(string.format(
    '\\nWRK_JSON {{"requests":%d,"duration_us":%d,"errors":%d,"status_errors":%d,' ..
    '"p50_us":%d,"p99_us":%d,"mean_us":%d}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    e.status, latency:percentile(50), latency:percentile(99), latency.mean))
end
""",
        encoding="utf-8",
    )
    return path


def _wrk(url: str, script: Path, connections: int, seconds: float) -> dict[str, float]:
    import subprocess

    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{round(seconds)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    data = json.loads(line.removeprefix("WRK_JSON "))
    return {
        "rps": data["requests"] / (data["duration_us"] / 1e6),
        "requests": data["requests"],
        # wrk counts a finished answer of any status as a request: a 503 or 507 (refused,
        # never upstream) is not an answer the ledger must hold.
        "answered": data["requests"] - data["status_errors"],
        "errors": data["errors"],
        "p50_us": data["p50_us"],
        "p99_us": data["p99_us"],
        "mean_us": data["mean_us"],
    }


def _open_loop(
    url: str,
    workdir: Path,
    tokens: list[str],
    chunks: int,
    rate: float,
    seconds: float,
    stream_body: str,
) -> dict[str, float]:
    """`rate` streams a second, open loop (bench/stream_load.py), each read to its end."""
    import subprocess

    body, token_file = workdir / "open-loop-body.json", workdir / "open-loop-tokens.txt"
    body.write_text(stream_body)
    token_file.write_text("\n".join(tokens))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.stream_load",
            "--url",
            url,
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            "--body-file",
            str(body),
            "--token-file",
            str(token_file),
            "--header",
            f"x-bench-chunks: {chunks}",
            "--token-header",
            "cf-access-jwt-assertion",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 120,
    )
    data = json.loads(out.stdout)
    served = data["outcomes"].get("served", 0)
    return {
        "rps": served / seconds,
        "requests": served,
        "answered": served,
        "errors": data["offered"] - served,
    }


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def _threads(pids: list[int]) -> dict[str, float]:
    """Every event-loop process's threads (the workers' under `serve --workers N`)."""
    out: dict[str, float] = {}
    for pid in event_loop_pids(pids):
        out.update(thread_cpu(pid))
    return out


def _idle_rate(pids: list[int], seconds: float = 2.0) -> float:
    """CPU seconds per second the processes spend with no load (timers, housekeeping): taken
    off a row's CPU, so that CPU per request does not grow just because a row with longer
    streams serves fewer requests per second."""
    before = _cpu(pids)
    time.sleep(seconds)
    return (_cpu(pids) - before) / seconds


# Envoy's counters that tell where an admitted call's record can be lost: Checks that
# failed at Envoy (its timeout: the answer, possibly an allow, never acted on) and metering
# records Envoy dropped (its gRPC access log backed up).
_ENVOY_COUNTERS = {
    "http.llm_ingress.ext_authz.error": "checks_failed",
    "access_logs.grpc_access_log.logs_dropped": "logs_dropped",
    "access_logs.grpc_access_log.logs_written": "logs_written",
}


def _envoy_counters(admin: int) -> dict[str, int]:
    text = httpx.get(f"http://{LOOPBACK}:{admin}/stats", timeout=10).text
    found = dict.fromkeys(_ENVOY_COUNTERS.values(), 0)
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name in _ENVOY_COUNTERS and value.isdigit():
            found[_ENVOY_COUNTERS[name]] = int(value)
    return found


def _ledger(http: str) -> dict[str, Any]:
    answer = httpx.get(
        f"{http}/v1/usage",
        params={"group_by": ""},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
    )
    answer.raise_for_status()
    rows = answer.json()["result"]
    return {
        "cost": sum((dollars(r["cost_usd"]) for r in rows), Decimal(0)),
        **{
            k: sum(int(r.get(k, 0)) for r in rows)
            for k in ("requests", "input_tokens", "output_tokens", "errors")
        },
    }


def _settled_ledger(http: str) -> dict[str, Any]:
    """The ledger once it has stopped moving: charges of streams cut at the end of a run
    land a moment after wrk returns."""
    last = _ledger(http)
    for _ in range(40):
        time.sleep(0.5)
        now = _ledger(http)
        if now == last:
            return now
        last = now
    raise RuntimeError("the ledger kept changing for 20 s after the load stopped")


def _open_reservations(http: str) -> int:
    """Reservations the sidecar still holds (`sidecar_reservations_open`, which its settle
    pass sets every second: read after the next pass)."""
    time.sleep(1.5)
    answer = httpx.get(f"{http}/metrics", timeout=30)
    answer.raise_for_status()
    for line in answer.text.splitlines():
        if line.startswith("sidecar_reservations_open "):
            return int(float(line.split()[1]))
    raise RuntimeError("the sidecar's /metrics has no sidecar_reservations_open")


def _exact(
    before: dict[str, Any],
    after: dict[str, Any],
    chunks: int,
    completed: int,
    unit: int,
    reserved: int,
    still_open: int = 0,
) -> dict[str, Any]:
    """Every call on the ledger cost exactly its usage (the stream's usage chunk arrived),
    its reservation (cut after reaching the provider, before the usage) or $0 (never reached
    the provider: wrk hung up while Envoy still held it; counted in `errors`); every answer
    the client completed is one charged its usage; and no admitted call is left without its
    record once the ledger has settled (`still_open`: it would expire into its estimate, a
    charge for a call that, without a record, may never have gone upstream)."""
    requests = after["requests"] - before["requests"]
    with_usage = (after["input_tokens"] - before["input_tokens"]) // PROMPT_TOKENS
    free = after["errors"] - before["errors"]
    at_reservation = requests - with_usage - free
    cost = int((after["cost"] - before["cost"]) * 1_000_000)
    expected = with_usage * unit + at_reservation * reserved
    ok = (
        cost == expected
        and at_reservation >= 0
        and after["output_tokens"] - before["output_tokens"] == with_usage * chunks
        and with_usage >= completed
        and still_open == 0
    )
    return {
        "exact": ok,
        "ledger_requests": requests,
        "charged_usage": with_usage,
        "charged_reservation": at_reservation,
        "charged_nothing": free,
        "left_open": still_open,
        "cost_micros": cost,
        "expected_micros": expected,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--chunks", type=int, nargs="*", default=list(CHUNKS))
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="offer this many streams a second, open loop, in every row "
        "instead of wrk's closed loop: CPU per request at equal load",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the sidecar during the product rows; collapsed stacks here",
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="with --profile: C frames too (see bench.cpu.start_profile)",
    )
    parser.add_argument(
        "--baseline", type=Path, help="a source tree whose sidecar is measured as a row of its own"
    )
    parser.add_argument(
        "--client-usage",
        action="store_true",
        help="the client sets stream_options.include_usage itself",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="backend processes in every row: `serve --workers N`, N floors",
    )
    args = parser.parse_args(argv)
    ensure_tools()
    os.environ.update(demo_key_env())
    issuer = DevIssuer.generate()
    tokens = [issuer.mint(f"user{i}@example.com", GROUPS, ttl=6 * 3600) for i in range(USERS)]
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        jwks = issuer.write_jwks(workdir / "jwks.json")
        rs = build_ruleset(parse_config(bench_config(issuer, str(jwks), "sqlite:///x.db")))
        price = rs.prices.price("openai", MODEL)
        assert price is not None
        stream_body = STREAM_BODY_WITH_USAGE if args.client_usage else STREAM_BODY
        body = json.loads(stream_body)
        reserved = estimate_micros(
            price,
            estimate_input_tokens(body),
            requested_output_tokens(body, rs.default_max_output_tokens),
        )

        upstream, upstream_port = sse_upstream.start(stack, workdir)
        floor_port = free_port()
        floors = [
            stack.enter_context(
                ManagedProcess(
                    f"floor{i}",
                    [sys.executable, "-m", "bench.noop_authz", "--port", str(floor_port)],
                    workdir,
                ).start()
            )
            for i in range(args.workers)
        ]
        for floor in floors:
            wait_for_port(LOOPBACK, floor_port, 20, process=floor)
        # Row: (backend's gRPC port, its pids, its HTTP API for the ledger; None: the floor).
        backends: dict[str, tuple[int, list[int], str | None]] = {
            "floor": (floor_port, [f.pid for f in floors if f.pid is not None], None)
        }
        sidecars = {"product": None, **({"baseline": args.baseline} if args.baseline else {})}
        for key, src in sidecars.items():
            grpc_port, http_port = free_port(), free_port()
            config = bench_config(issuer, str(jwks), f"sqlite:///{workdir}/{key}.db")
            (workdir / f"{key}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            env = {**os.environ, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN}
            if src is not None:
                env["PYTHONPATH"] = str(src.resolve())
            sidecar = stack.enter_context(
                ManagedProcess(
                    key,
                    serve_argv(workdir / f"{key}.yaml", grpc_port, http_port, args.workers),
                    workdir,
                    env=env,
                    cwd=workdir,
                ).start()
            )
            http = f"http://{LOOPBACK}:{http_port}"
            wait_ready(http, sidecar, timeout=60)
            assert sidecar.pid is not None
            backends[key] = (grpc_port, [sidecar.pid], http)
        rows = {}
        admins: dict[str, int] = {}
        for key, (port, pids, api) in backends.items():
            listen, admin = free_port(), free_port()
            envoy, _ = start_envoy(
                workdir,
                _envoy_config(
                    listen,
                    admin,
                    port,
                    upstream_port,
                    key == "floor",
                    args.workers,
                    sidecars[key] / "sidecar/envoy/meter.lua" if sidecars.get(key) else None,
                ),
                base_id=listen,
            )
            stack.enter_context(envoy)
            assert envoy.pid is not None and upstream.pid is not None
            rows[key] = (
                f"http://{LOOPBACK}:{listen}{PATH}",
                pids,
                api,
                {"envoy": [envoy.pid], "backend": pids, "upstream": [upstream.pid]},
            )
            admins[key] = admin
        for chunks in args.chunks:
            script = _wrk_script(workdir / f"wrk-{chunks}.lua", tokens, chunks, stream_body)
            unit = cost_micros(price, TokenUsage(PROMPT_TOKENS, chunks))
            for url, _, _, _ in rows.values():
                _wrk(url, script, args.connections, 2)  # warm-up
            for rnd in range(args.rounds):
                order = list(rows.items()) if rnd % 2 == 0 else list(rows.items())[::-1]
                trial: dict[str, Any] = {"chunks": chunks, "round": rnd}
                for key, (url, pids, api, groups) in order:
                    before = _settled_ledger(api) if api is not None else None
                    counted = _envoy_counters(admins[key])
                    spy = None
                    if args.profile and key == "product":
                        spy = start_profile(
                            pids[0],
                            workdir / f"spy-{chunks}-{rnd}.txt",
                            args.seconds,
                            native=args.native,
                        )
                    idle = _idle_rate(pids)
                    cpu, threads = _cpu(pids), _threads(pids)
                    sample = Sample(
                        groups, {"backend": event_loop_pids(pids), "upstream": groups["upstream"]}
                    )
                    result: dict[str, Any] = {
                        **(
                            _open_loop(
                                url, workdir, tokens, chunks, args.rate, args.seconds, stream_body
                            )
                            if args.rate
                            else _wrk(url, script, args.connections, args.seconds)
                        )
                    }
                    result["cores"] = sample.finish()
                    # All the stack's CPU (Envoy, backend, upstream, wrk, interrupts) per
                    # request: what a CPU-bound row's throughput is the inverse of.
                    result["stack_us_per_request"] = (
                        result["cores"]["stack_cores"] / max(result["rps"], 1e-9) * 1e6
                    )
                    used = _cpu(pids) - cpu - idle * args.seconds
                    # The event loop (the main thread, tid = pid) and the store's thread.
                    result["threads_us_per_request"] = dict(
                        busiest_threads(threads, _threads(pids), int(result["requests"]), 2)
                    )
                    if spy is not None:
                        spy.wait(timeout=60)
                        with args.profile.open("a") as sink:
                            sink.write((workdir / f"spy-{chunks}-{rnd}.txt").read_text())
                    result["cpu_us_per_request"] = used / max(result["requests"], 1) * 1e6
                    if before is not None and api is not None:
                        result.update(
                            _exact(
                                before,
                                _settled_ledger(api),
                                chunks,
                                int(result["answered"]),
                                unit,
                                reserved,
                                _open_reservations(api),
                            )
                        )
                        after = _envoy_counters(admins[key])
                        result["envoy"] = {k: after[k] - counted[k] for k in counted}
                    trial[key] = result
                floor_rps = trial["floor"]["rps"]
                trial["x_floor"] = trial["product"]["rps"] / floor_rps if floor_rps else 0.0
                line = (
                    f"chunks {chunks:3} round {rnd}: floor {floor_rps:7.0f} rps "
                    f"{trial['floor']['cpu_us_per_request']:6.0f} us/req | product "
                    f"{trial['product']['rps']:7.0f} rps "
                    f"{trial['product']['cpu_us_per_request']:6.0f} us/req "
                    f"x{trial['x_floor']:.2f} errors={trial['product']['errors']} "
                    f"exact={trial['product']['exact']}"
                    f" left_open={trial['product']['left_open']}"
                    f" envoy_checks_failed={trial['product']['envoy']['checks_failed']}"
                    f" envoy_logs_dropped={trial['product']['envoy']['logs_dropped']}"
                )
                if "baseline" in trial:
                    base = trial["baseline"]
                    trial["x_baseline_rps"] = trial["product"]["rps"] / base["rps"]
                    trial["cpu_x_baseline"] = (
                        trial["product"]["cpu_us_per_request"] / base["cpu_us_per_request"]
                    )
                    line += (
                        f" | baseline {base['rps']:7.0f} rps "
                        f"{base['cpu_us_per_request']:6.0f} us/req "
                        f"exact={base['exact']} | product cpu "
                        f"x{trial['cpu_x_baseline']:.2f} of baseline"
                    )
                results.setdefault(str(chunks), []).append(trial)
                print(line, file=sys.stderr, flush=True)
                for key in rows:
                    c, r = trial[key]["cores"], trial[key]
                    print(
                        f"    {key} cores busy: machine {c['machine_cores']:.2f} = envoy "
                        f"{c['envoy_cores']:.2f} + backend {c['backend_cores']:.2f} + "
                        f"upstream {c['upstream_cores']:.2f} + wrk "
                        f"{c['load_generator_cores']:.2f} + irq {c['interrupts_cores']:.2f} + "
                        f"others {c['others_cores']:.2f}; stack "
                        f"{r['stack_us_per_request']:.0f} us/req"
                        f" | busiest loop: backend {c['backend_loop']:.2f} upstream "
                        f"{c['upstream_loop']:.2f} | latency mean "
                        f"{r.get('mean_us', 0) / 1000:.1f} ms p99 "
                        f"{r.get('p99_us', 0) / 1000:.1f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
                for key in sidecars:
                    split = ", ".join(
                        f"{name} {us:.0f}"
                        for name, us in trial[key]["threads_us_per_request"].items()
                    )
                    print(f"    {key} threads us/req: {split}", file=sys.stderr, flush=True)
    summary = {
        chunks: {
            "floor_rps": median(t["floor"]["rps"] for t in trials),
            "product_rps": median(t["product"]["rps"] for t in trials),
            "x_floor": median(t["x_floor"] for t in trials),
            "floor_cpu_us_per_request": median(t["floor"]["cpu_us_per_request"] for t in trials),
            "product_cpu_us_per_request": median(
                t["product"]["cpu_us_per_request"] for t in trials
            ),
            **{
                f"{row}_{name}": median(
                    # Open-loop rows (--rate) time requests their own way: no mean_us.
                    t[row].get(key, 0.0) if not sub else t[row]["cores"][sub]
                    for t in trials
                )
                for row in ("floor", "product")
                for name, key, sub in (
                    ("stack_us_per_request", "stack_us_per_request", None),
                    ("mean_latency_us", "mean_us", None),
                    ("machine_cores", "", "machine_cores"),
                    ("stack_cores", "", "stack_cores"),
                    ("backend_cores", "", "backend_cores"),
                    ("envoy_cores", "", "envoy_cores"),
                    ("backend_busiest_loop", "", "backend_loop"),
                )
            },
            "errors": sum(t["product"]["errors"] + t["floor"]["errors"] for t in trials),
            "ledger_exact": all(t["product"]["exact"] for t in trials),
            **(
                {
                    "baseline_rps": median(t["baseline"]["rps"] for t in trials),
                    "baseline_cpu_us_per_request": median(
                        t["baseline"]["cpu_us_per_request"] for t in trials
                    ),
                    "product_cpu_x_baseline": median(t["cpu_x_baseline"] for t in trials),
                    "baseline_ledger_exact": all(t["baseline"]["exact"] for t in trials),
                }
                if args.baseline
                else {}
            ),
        }
        for chunks, trials in results.items()
    }
    report = {
        "workers": args.workers,
        "connections": args.connections,
        "summary": summary,
        "trials": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
