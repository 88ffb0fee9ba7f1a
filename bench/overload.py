"""Overload benchmark: served streams per second at 1x, 2x and 3x the whole path's capacity.

    .venv/bin/python -m bench.overload            # about 2 minutes on 2 cores
    .venv/bin/python -m bench.overload --quick    # shorter runs, to check the setup

One stack on loopback (fake provider streaming 16 SSE frames over about 1.6 s, the sidecar
on SQLite with its default overload settings, Envoy from the wheel), 100 distinct users.
Capacity is first found as the highest offered rate at which everything is served; then
each multiple runs open loop (arrivals spread evenly, whatever the answers) and reports
streams served per second, retryable 503s, and anything else (which should be nothing).
No collapse means served/s at 3x stays at least at served/s at 1x. After each row the
ledger must hold exactly the served streams at their metered price.
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

from sidecar.demo.config import demo_config
from sidecar.demo.keys import DevIssuer
from sidecar.demo.stack import Stack, running_stack

RESULTS = Path(__file__).resolve().parent / "results"
MESSAGES = [{"role": "user", "content": "Stream sixteen words for the overload benchmark."}]
BODY = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 16, "stream": True,
        "stream_options": {"include_usage": True}}
FRAME_DELAY_MS = 100
USERS = 100


def offer(stack: Stack, workdir: Path, rate: float, seconds: float,
          procs: int = 1) -> dict[str, Any]:
    """Open-loop arrivals at `rate`, split over `procs` generator processes (one Python
    process keeps its schedule up to a few hundred streams per second on a shared core)."""
    body_file, token_file = workdir / "body.json", workdir / "tokens.txt"
    argv = [sys.executable, "-m", "bench.stream_load", "--url",
            stack.envoy_url + "/openai/v1/chat/completions", "--rate", str(rate / procs),
            "--seconds", str(seconds), "--body-file", str(body_file),
            "--token-file", str(token_file), "--header", f"x-fake-delay-ms: {FRAME_DELAY_MS}"]
    running = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
               for _ in range(procs)]
    parts = []
    for proc in running:
        out, _ = proc.communicate(timeout=seconds + 120)
        parts.append(json.loads(out))
    outcomes: dict[str, int] = {}
    for part in parts:
        for key, value in part["outcomes"].items():
            outcomes[key] = outcomes.get(key, 0) + value
    result: dict[str, Any] = {
        "offered": sum(p["offered"] for p in parts), "offered_rate": rate,
        "seconds": seconds, "send_seconds": max(p["send_seconds"] for p in parts),
        "total_seconds": max(p["total_seconds"] for p in parts), "outcomes": outcomes,
        "odd_samples": [s for p in parts for s in p.get("odd_samples", [])][:5],
        "generator_processes": procs}
    result["served_per_second"] = round(outcomes.get("served", 0) / seconds, 1)
    return result


def generators(rate: float) -> int:
    return max(1, min(8, round(rate / 150)))


def ledger(stack: Stack) -> tuple[int, int]:
    """(requests charged without an error, µUSD): a provider error or a call that never
    reached the provider is a request at $0 in `errors`, not a served stream."""
    with stack.admin() as admin:
        rows = admin.get("/v1/usage").json()["result"]
    return (sum(r["requests"] - r.get("errors", 0) for r in rows),
            sum(round(r["cost_usd"] * 1_000_000) for r in rows))


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
    parser.add_argument("--max-rate", type=float, default=1600.0,
                        help="highest rate the capacity probe tries (streams/s)")
    args = parser.parse_args()
    seconds = 4.0 if args.quick else 10.0
    issuer = DevIssuer.generate()
    with tempfile.TemporaryDirectory(prefix="sidecar-overload-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        jwks = str(issuer.write_jwks(workdir / "jwks.json"))
        config = demo_config(issuer, jwks, f"sqlite:///{workdir}/s.db")
        (workdir / "body.json").write_text(json.dumps(BODY))
        (workdir / "tokens.txt").write_text("\n".join(
            issuer.mint(f"load-{i}@bench.test") for i in range(USERS)))
        with running_stack(workdir / "stack", issuer, config) as stack:
            rows: list[dict[str, Any]] = []
            # Capacity: double the rate until something is not served, then settle on the
            # last rate served in full.
            rate, capacity = 25.0, 0.0
            while rate <= args.max_rate:
                try:
                    probe = offer(stack, workdir, rate, seconds / 2, generators(rate))
                except subprocess.TimeoutExpired:
                    break
                if probe["outcomes"].get("served", 0) < probe["offered"]:
                    break
                if probe["send_seconds"] > 1.25 * seconds / 2:
                    # The load generator itself could not keep the schedule: past here it,
                    # not the server, would be measured.
                    break
                capacity, rate = rate, rate * 2
            capacity = capacity or 25.0
            unit_cost = 0
            before = ledger(stack)
            for multiple in (1, 2, 3):
                result = offer(stack, workdir, capacity * multiple, seconds,
                               generators(capacity * multiple))
                served = result["outcomes"].get("served", 0)
                after = settled(stack, before[0] + served)
                requests, cost = after[0] - before[0], after[1] - before[1]
                unit_cost = unit_cost or (cost // requests if requests else 0)
                result.update(multiple=multiple, ledger_requests=requests, ledger_cost=cost,
                              ledger_exact=requests == served
                              and cost == served * unit_cost)
                rows.append(result)
                before = after
            metrics = httpx.get(stack.admin_url + "/metrics", timeout=10).text
    shed = [line for line in metrics.splitlines() if line.startswith("sidecar_shed_total")]
    report = {"capacity_streams_per_second": capacity, "rows": rows, "shed": shed,
              "frame_delay_ms": FRAME_DELAY_MS, "frames": 16, "users": USERS}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overload.json").write_text(json.dumps(report, indent=2) + "\n")
    base = rows[0]["served_per_second"] or 1
    print(f"capacity (all served): {capacity:g} streams/s")
    print("multiple  offered/s  served/s  ratio_to_1x  refused_503  other  ledger_exact")
    for row in rows:
        other = {k: v for k, v in row["outcomes"].items() if k not in ("served", "refused")}
        print(f"{row['multiple']}x        {row['offered_rate']:>8g}  "
              f"{row['served_per_second']:>8}  {row['served_per_second'] / base:>11.2f}  "
              f"{row['outcomes'].get('refused', 0):>11}  {sum(other.values()):>5}  "
              f"{row['ledger_exact']}")


if __name__ == "__main__":
    main()
