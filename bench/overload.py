"""Overload benchmark: served streams per second at 1x, 2x and 3x the whole path's capacity.

    .venv/bin/python -m bench.overload            # about 3 minutes on 2 cores
    .venv/bin/python -m bench.overload --quick    # shorter runs, to check the setup
    .venv/bin/python -m bench.overload --multiples 1,2,3,6   # and a row far past capacity

One stack on loopback (bench/sse_upstream.py streaming 16 SSE frames 100 ms apart, the
sidecar on SQLite with its default overload settings, Envoy from the wheel), 100 distinct users,
and an open-loop generator of raw HTTP/1.1 (bench/stream_load.py) cheap enough to offer
several times what the stack serves from the same 2 cores.

Capacity is the highest offered rate at which every stream is served and the p99 of the
sidecar's Check time (`sidecar_check_seconds`) stays below 1 s, half Envoy's 2 s Check
deadline: found by doubling the rate until that fails, then halving the gap twice. Then
each multiple runs open loop (arrivals spread evenly, whatever the answers) and reports
streams served per second, retryable 503s by who refused (the sidecar's shedding; Envoy's
Checks circuit breaker, at once; Envoy's ext_authz timeout, after 2 s) and how long a
refusal took (p50/p99 ms), and anything else (which should be nothing).
No collapse means served/s at 3x stays at least at served/s at 1x. After each row the
ledger must hold exactly the served streams at their metered price, and Envoy's gRPC access
log must have dropped no record (`access_logs.grpc_access_log.logs_dropped`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack
from sidecar.envoy.attach import CHECK_CLUSTER

RESULTS = Path(__file__).resolve().parent / "results"
MESSAGES = [{"role": "user", "content": "Stream sixteen words for the overload benchmark."}]
BODY = {
    "model": "gpt-4o-mini",
    "messages": MESSAGES,
    "max_tokens": 16,
    "stream": True,
    "stream_options": {"include_usage": True},
}
FRAME_DELAY_MS = 100
FRAMES = 16
# The upstream: plain asyncio streaming FRAMES chunks FRAME_DELAY_MS apart. The fake provider
# (uvicorn) ran out first, at about 650 streams/s (Envoy's connects to it timed out), so
# the bench measured it rather than the sidecar.
UPSTREAM = [sys.executable, "-m", "bench.sse_upstream", "--gap-ms", str(FRAME_DELAY_MS)]
USERS = 100
# Half Envoy's 2 s Check deadline (and a bucket bound of sidecar_check_seconds).
CHECK_P99_LIMIT = 1.0


def offer(
    stack: Stack, workdir: Path, rate: float, seconds: float, procs: int = 1
) -> dict[str, Any]:
    """Open-loop arrivals at `rate`, split over `procs` generator processes (one Python
    process keeps its schedule up to a few hundred streams per second on a shared core)."""
    body_file, token_file = workdir / "body.json", workdir / "tokens.txt"
    argv = [
        sys.executable,
        "-m",
        "bench.stream_load",
        "--url",
        stack.envoy_url + "/openai/v1/chat/completions",
        "--rate",
        str(rate / procs),
        "--seconds",
        str(seconds),
        "--body-file",
        str(body_file),
        "--token-file",
        str(token_file),
        "--header",
        f"x-bench-chunks: {FRAMES}",
    ]
    running = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    parts = []
    for proc in running:
        out, _ = proc.communicate(timeout=seconds + 120)
        parts.append(json.loads(out))
    outcomes: dict[str, int] = {}
    for part in parts:
        for key, value in part["outcomes"].items():
            outcomes[key] = outcomes.get(key, 0) + value
    result: dict[str, Any] = {
        "offered": sum(p["offered"] for p in parts),
        "offered_rate": rate,
        "seconds": seconds,
        "send_seconds": max(p["send_seconds"] for p in parts),
        "total_seconds": max(p["total_seconds"] for p in parts),
        "outcomes": outcomes,
        "odd_samples": [s for p in parts for s in p.get("odd_samples", [])][:5],
        "generator_processes": procs,
    }
    result["served_per_second"] = round(outcomes.get("served", 0) / seconds, 1)
    refused_ms = sorted(ms for p in parts for ms in p.get("refused_ms", []))
    result["refused_ms"] = (
        {
            "p50": refused_ms[len(refused_ms) // 2],
            "p99": refused_ms[int(len(refused_ms) * 0.99)],
            "max": refused_ms[-1],
        }
        if refused_ms
        else {}
    )
    return result


def generators(rate: float) -> int:
    # One raw-socket generator process keeps a schedule of about 2,500 arrivals/s.
    return max(1, min(4, round(rate / 2000)))


def _scrape(url: str, prefixes: tuple[str, ...]) -> dict[str, float]:
    text = httpx.get(url, timeout=10).text
    found = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            name, _, value = line.rpartition(" ")
            found[name.strip().rstrip(":")] = float(value)
    return found


# Envoy's counts of Checks it answered for the sidecar: refused at once by the Checks
# cluster's circuit breaker (max_requests, or max_pending_requests while connecting), or
# given up on at the ext_authz timeout.
CHECK_OVERFLOW = (
    f"cluster.{CHECK_CLUSTER}.upstream_rq_active_overflow",
    f"cluster.{CHECK_CLUSTER}.upstream_rq_pending_overflow",
)
CHECK_TIMEOUT = f"cluster.{CHECK_CLUSTER}.upstream_rq_timeout"


def counters(stack: Stack) -> dict[str, float]:
    """Check-time buckets and shed counts (sidecar), records written/dropped and Checks
    refused or timed out (Envoy)."""
    found = _scrape(
        stack.admin_url + "/metrics",
        ("sidecar_check_seconds_bucket", "sidecar_check_seconds_count", "sidecar_shed_total"),
    )
    envoy = httpx.get(stack.envoy_admin_url + "/stats", timeout=10).text
    for line in envoy.splitlines():
        name, _, value = line.partition(": ")
        if "grpc_access_log" in name and name.endswith(("logs_written", "logs_dropped")):
            found[name.rsplit(".", 1)[1]] = float(value)
        elif name in (*CHECK_OVERFLOW, CHECK_TIMEOUT):
            found[name] = float(value)
    return found


def p99_check_seconds(before: dict[str, float], after: dict[str, float]) -> float:
    """The upper bound of the bucket holding the 99th percentile Check time between the two
    scrapes (inf when it is past the largest bucket)."""
    count = after.get("sidecar_check_seconds_count", 0) - before.get(
        "sidecar_check_seconds_count", 0
    )
    if count <= 0:
        return 0.0
    bounds = []
    for name, value in after.items():
        if name.startswith("sidecar_check_seconds_bucket"):
            bound = float(name.split('le="')[1].split('"')[0])
            bounds.append((bound, value - before.get(name, 0)))
    for bound, seen in sorted(bounds):
        if seen >= 0.99 * count:
            return bound
    return float("inf")


def quiet(stack: Stack) -> tuple[int, int]:
    """The ledger once the charges of earlier runs have landed (it stopped moving)."""
    last = ledger(stack)
    for _ in range(60):
        time.sleep(1.0)
        now = ledger(stack)
        if now == last:
            return now
        last = now
    return last


def delta(before: dict[str, float], after: dict[str, float], key: str) -> int:
    return round(after.get(key, 0) - before.get(key, 0))


def measured(stack: Stack, workdir: Path, rate: float, seconds: float) -> dict[str, Any]:
    """One open-loop run, with the p99 Check time and the access log's records over it."""
    before = counters(stack)
    result = offer(stack, workdir, rate, seconds, generators(rate))
    after = counters(stack)
    p99 = p99_check_seconds(before, after)
    result["p99_check_seconds"] = p99 if p99 != float("inf") else "over 1 s"
    result["records_written"] = delta(before, after, "logs_written")
    result["records_dropped"] = delta(before, after, "logs_dropped")
    result["shed"] = {
        key.split('"')[1]: delta(before, after, key)
        for key in after
        if key.startswith("sidecar_shed_total")
    }
    result["refused_by_sidecar"] = sum(result["shed"].values())
    result["refused_by_envoy_at_once"] = sum(delta(before, after, k) for k in CHECK_OVERFLOW)
    result["refused_by_envoy_at_timeout"] = delta(before, after, CHECK_TIMEOUT)
    return result


def within_capacity(probe: dict[str, Any], seconds: float) -> bool:
    return bool(
        probe["outcomes"].get("served", 0) == probe["offered"]
        and probe["p99_check_seconds"] != "over 1 s"
        and probe["p99_check_seconds"] <= CHECK_P99_LIMIT
        # The generator kept its schedule: past that it, not the server, is measured.
        and probe["send_seconds"] <= 1.25 * seconds
    )


def ledger(stack: Stack) -> tuple[int, int]:
    """(requests charged without an error, µUSD): a provider error or a call that never
    reached the provider is a request at $0 in `errors`, not a served stream."""
    with stack.admin() as admin:
        rows = admin.get("/v1/usage").json()["result"]
    return (
        sum(r["requests"] - r.get("errors", 0) for r in rows),
        sum(round(r["cost_usd"] * 1_000_000) for r in rows),
    )


def settled(stack: Stack, served: int, timeout: float = 60) -> tuple[int, int]:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        got = ledger(stack)
        if got[0] >= served:
            return got
        time.sleep(0.5)
    return ledger(stack)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep its logs")
    parser.add_argument(
        "--max-rate",
        type=float,
        default=6400.0,
        help="highest rate the capacity probe tries (streams/s)",
    )
    parser.add_argument(
        "--multiples",
        default="1,2,3",
        help="the multiples of capacity offered, the first one the baseline (default: 1,2,3)",
    )
    args = parser.parse_args()
    multiples = [float(m) for m in args.multiples.split(",")]
    if not multiples or any(m <= 0 for m in multiples):
        parser.error("--multiples must be positive numbers, e.g. 1,2,3,6")
    seconds = 4.0 if args.quick else 10.0
    issuer = DevIssuer.generate()
    with tempfile.TemporaryDirectory(prefix="sidecar-overload-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        jwks = str(issuer.write_jwks(workdir / "jwks.json"))
        config = demo_config(issuer, jwks, f"sqlite:///{workdir}/s.db")
        (workdir / "body.json").write_text(json.dumps(BODY))
        (workdir / "tokens.txt").write_text(
            "\n".join(issuer.mint(f"load-{i}@bench.test") for i in range(USERS))
        )
        with running_stack(workdir / "stack", issuer, config, provider_argv=UPSTREAM) as stack:
            rows: list[dict[str, Any]] = []
            # Capacity: double the rate until a probe is not within capacity, then halve
            # the gap between the last good and the first bad rate twice.
            probe_seconds = seconds
            good, bad, rate = 0.0, 0.0, 100.0
            probes: list[dict[str, Any]] = []

            def probe(at: float) -> bool:
                result = measured(stack, workdir, at, probe_seconds)
                ok = within_capacity(result, probe_seconds)
                probes.append(
                    {
                        "offered_rate": at,
                        "outcomes": result["outcomes"],
                        "p99_check_seconds": result["p99_check_seconds"],
                        "send_seconds": result["send_seconds"],
                        "within": ok,
                    }
                )
                return ok

            while rate <= args.max_rate:
                if not probe(rate):
                    bad = rate
                    break
                good, rate = rate, rate * 2
            for _ in range(2 if bad else 0):
                middle = (good + bad) / 2
                if probe(middle):
                    good = middle
                else:
                    bad = middle
            capacity = good or 50.0
            unit_cost = 0
            before = quiet(stack)
            for multiple in multiples:
                result = measured(stack, workdir, capacity * multiple, seconds)
                served = result["outcomes"].get("served", 0)
                after = settled(stack, before[0] + served)
                requests, cost = after[0] - before[0], after[1] - before[1]
                unit_cost = unit_cost or (cost // requests if requests else 0)
                result.update(
                    multiple=multiple,
                    ledger_requests=requests,
                    ledger_cost=cost,
                    ledger_exact=requests == served and cost == served * unit_cost,
                )
                rows.append(result)
                before = after
            metrics = httpx.get(stack.admin_url + "/metrics", timeout=10).text
    shed = [line for line in metrics.splitlines() if line.startswith("sidecar_shed_total")]
    report = {
        "capacity_streams_per_second": capacity,
        "probes": probes,
        "rows": rows,
        "shed": shed,
        "frame_delay_ms": FRAME_DELAY_MS,
        "frames": FRAMES,
        "users": USERS,
        "upstream": "bench/sse_upstream.py",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overload.json").write_text(json.dumps(report, indent=2) + "\n")
    base = rows[0]["served_per_second"] or 1
    print(f"capacity (all served, p99 Check < {CHECK_P99_LIMIT:g} s): {capacity:g} streams/s")
    print(
        "multiple  offered/s  served/s  ratio_to_1x  refused_503  by_sidecar  "
        "by_envoy_at_once  by_envoy_timeout  refused_p50/p99_ms  other  p99_check_s  "
        "records_dropped  ledger_exact"
    )
    for row in rows:
        other = {k: v for k, v in row["outcomes"].items() if k not in ("served", "refused")}
        ms = row["refused_ms"]
        latency = f"{ms['p50']}/{ms['p99']}" if ms else "-"
        print(
            f"{row['multiple']:g}x        {row['offered_rate']:>8g}  "
            f"{row['served_per_second']:>8}  {row['served_per_second'] / base:>11.2f}  "
            f"{row['outcomes'].get('refused', 0):>11}  {row['refused_by_sidecar']:>10}  "
            f"{row['refused_by_envoy_at_once']:>16}  {row['refused_by_envoy_at_timeout']:>16}  "
            f"{latency:>18}  {sum(other.values()):>5}  "
            f"{row['p99_check_seconds']!s:>11}  {row['records_dropped']:>15}  "
            f"{row['ledger_exact']}"
        )


if __name__ == "__main__":
    main()
