"""Sidecar CPU per request: rows of bench.rows under wrk, alternated, with each backend
process's CPU time (user + system, from /proc) divided by the requests wrk completed; for
the Redis rows, the redis-server's too (the rows share one); and the backend's and Envoy's
context switches and the backend's page faults per request.

    .venv/bin/python -m bench.cpu [--rows floor sqlite] [--rounds 3] [--seconds 8]
        [--profile sqlite [--native]]   # also py-spy records that row's sidecar
        [--threads]                      # and each backend thread's CPU per request
        [--baseline DIR]                 # and each sidecar row again, run from DIR

Prints one line per row and round, and a JSON summary on stdout. With `--profile ROW` the
py-spy flame graph input (collapsed stacks) is written to bench/results/profile-ROW.txt and
the top self-time functions are printed. With `--baseline DIR` (say `git archive main | tar
-x -C DIR`) every sidecar row also runs from DIR's `sidecar` package, as row `KEY@base`,
alternated with the others in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from statistics import median
from typing import Any

from bench.closed_loop import ensure_tools, run_wrk, write_script
from bench.machine import children
from bench.policy import BODY, PATH, token
from bench.rows import ROWS, Bench, Row, wait_answering, with_baseline
from devtools.keys import DevIssuer

RESULTS = Path(__file__).resolve().parent / "results"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children so far (0 when it is gone)."""
    total = 0.0
    for each in (pid, *children(pid)):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def kernel_counts(pid: int) -> tuple[int, int]:
    """(context switches, minor page faults) of every thread of `pid` so far; (0, 0) when
    it is gone. A switch away from the event loop in mid-decision leaves its caches cold
    when it resumes; on a virtual machine a wakeup on another CPU and a page fault also
    trap out to the host (both cost several µs on some machine kinds)."""
    switches = faults = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tids:
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        switches += sum(
            int(line.split()[-1]) for line in status.splitlines() if "ctxt_switches:" in line
        )
        faults += int(stat.rsplit(")", 1)[1].split()[7])
    return switches, faults


def per_request(before: tuple[int, int], after: tuple[int, int], requests: int) -> list[float]:
    """Each of two `kernel_counts` readings' differences, per request."""
    return [(b - a) / requests if requests else 0.0 for a, b in zip(before, after, strict=True)]


def thread_cpu(pid: int) -> dict[str, float]:
    """User + system CPU of each thread of `pid` so far, by "name/tid" (Python threads are
    all named after the executable; the main thread's tid is the pid, the store's worker
    thread starts next, then gRPC's poller)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[f"{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / TICKS
    return out


def busiest_threads(
    before: dict[str, float], after: dict[str, float], requests: int, n: int = 4
) -> list[tuple[str, float]]:
    """The `n` threads that used the most CPU between two `thread_cpu` readings, in µs per
    request."""
    used = sorted(
        ((key, after[key] - before.get(key, 0.0)) for key in after), key=lambda item: -item[1]
    )
    return [
        (key, seconds / requests * 1e6) for key, seconds in used[:n] if requests and seconds > 0
    ]


def start_profile(
    pid: int, out: Path, seconds: float, native: bool = False
) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` for `seconds` into `out` (collapsed stacks); with `native`,
    C frames too (gRPC's Cython core, protobuf, sqlite3), which otherwise count as the
    self time of the Python function that called them. Native unwinding pauses the process
    for each sample (py-spy cannot do it non-blocking), so that row's numbers drop."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            "250",
            "--output",
            str(out),
            "--duration",
            str(round(seconds)),
            *(["--native"] if native else ["--nonblocking"]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def backend_pid(row: Row) -> int | None:
    """The sidecar's (or the floor's) process: the row's first non-Envoy process."""
    for proc in row.processes:
        if not proc.name.startswith("envoy") and proc.pid is not None:
            return proc.pid
    return None


def envoy_pid(row: Row) -> int | None:
    """The row's Envoy: its CPU is on the same cores as the sidecar's."""
    for proc in row.processes:
        if proc.name.startswith("envoy") and proc.pid is not None:
            return proc.pid
    return None


def top_inclusive(collapsed: Path, n: int = 40) -> list[tuple[str, float]]:
    """Functions by the share of samples they are anywhere on the stack in."""
    counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for frame in set(stack.split(";")):
            counts[frame] += int(count)
    return [(frame, c / total) for frame, c in counts.most_common(n)] if total else []


def top_self(collapsed: Path, n: int = 25) -> list[tuple[str, float]]:
    """The functions with the most samples at the top of the stack, as shares of all."""
    counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        counts[stack.split(";")[-1]] += int(count)
    return [(frame, c / total) for frame, c in counts.most_common(n)] if total else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=["floor", "sqlite"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--profile", help="py-spy record this row's sidecar in every round")
    parser.add_argument("--native", action="store_true", help="with --profile: C frames too")
    parser.add_argument(
        "--threads", action="store_true", help="also print each backend thread's CPU per request"
    )
    parser.add_argument("--baseline", type=Path, help="also run each sidecar row from this tree")
    args = parser.parse_args(argv)
    ensure_tools()
    specs = with_baseline([s for s in ROWS if s.key in args.rows], args.baseline)
    issuer = DevIssuer.generate()
    headers = {"content-type": "application/json", "cf-access-jwt-assertion": token(issuer)}
    per_row: dict[str, list[dict[str, float]]] = {s.key: [] for s in specs}
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        script = write_script(workdir / "request.lua", method="POST", body=BODY, headers=headers)
        bench = Bench(workdir, stack, issuer)
        rows = [bench.start(spec) for spec in specs]
        for row in rows:
            wait_answering(row.url + PATH, headers, BODY)
            run_wrk(row.url + PATH, script, connections=args.connections, seconds=2)
        collapsed = RESULTS / f"profile-{args.profile}.txt"
        for rnd in range(args.rounds):
            for row in rows if rnd % 2 == 0 else rows[::-1]:
                pid = backend_pid(row)
                spy = None
                if args.profile == row.spec.key and pid is not None:
                    spy = start_profile(
                        pid, workdir / f"spy-{rnd}.txt", args.seconds, native=args.native
                    )
                before = cpu_seconds(pid) if pid else 0.0
                proxy = envoy_pid(row)
                proxy_before = cpu_seconds(proxy) if proxy else 0.0
                counts_before = [kernel_counts(p) if p else (0, 0) for p in (pid, proxy)]
                store = bench.redis_process if row.spec.backend == "redis" else None
                store_pid = store.pid if store is not None else None
                store_before = cpu_seconds(store_pid) if store_pid else 0.0
                threads_before = thread_cpu(pid) if pid and args.threads else {}
                result = run_wrk(
                    row.url + PATH, script, connections=args.connections, seconds=args.seconds
                )
                used = (cpu_seconds(pid) if pid else 0.0) - before
                proxy_used = (cpu_seconds(proxy) if proxy else 0.0) - proxy_before
                store_used = (cpu_seconds(store_pid) if store_pid else 0.0) - store_before
                (switches, faults), (envoy_switches, envoy_faults) = (
                    per_request(b, kernel_counts(p) if p else (0, 0), result.requests)
                    for b, p in zip(counts_before, (pid, proxy), strict=True)
                )
                if pid and args.threads:
                    split = busiest_threads(threads_before, thread_cpu(pid), result.requests)
                    print(
                        f"round {rnd} {row.spec.key:10} threads: "
                        + ", ".join(f"{key} {us:.0f} us" for key, us in split),
                        file=sys.stderr,
                    )
                if spy is not None:
                    spy.wait(timeout=60)
                    with collapsed.open("a" if rnd else "w") as sink:
                        sink.write((workdir / f"spy-{rnd}.txt").read_text())
                us = used / result.requests * 1e6 if result.requests else 0.0
                envoy_us = proxy_used / result.requests * 1e6 if result.requests else 0.0
                redis_us = store_used / result.requests * 1e6 if result.requests else 0.0
                per_row[row.spec.key].append(
                    {
                        "rps": result.rps,
                        "cpu_us": us,
                        "envoy_cpu_us": envoy_us,
                        "redis_cpu_us": redis_us,
                        "errors": result.errors,
                        "switches": switches,
                        "envoy_switches": envoy_switches,
                        "faults": faults,
                    }
                )
                print(
                    f"round {rnd} {row.spec.key:10} {result.rps:8.0f} rps  "
                    f"{us:7.0f} us CPU/request  Envoy {envoy_us:5.0f} us  "
                    + (f"redis-server {redis_us:4.0f} us  " if store_pid else "")
                    + f"switches {switches:4.1f} (Envoy {envoy_switches:3.1f})  "
                    + f"faults {faults:4.2f} (Envoy {envoy_faults:4.2f})  "
                    + f"errors={result.errors}",
                    file=sys.stderr,
                )
        if args.profile:
            for frame, share in top_self(collapsed):
                print(f"{share * 100:5.1f}%  {frame}", file=sys.stderr)
    summary: dict[str, Any] = {
        key: {
            "rps": median(t["rps"] for t in trials),
            "cpu_us_per_request": median(t["cpu_us"] for t in trials),
            "envoy_cpu_us_per_request": median(t["envoy_cpu_us"] for t in trials),
            "redis_cpu_us_per_request": median(t["redis_cpu_us"] for t in trials),
            "errors": sum(t["errors"] for t in trials),
            "switches_per_request": median(t["switches"] for t in trials),
            "envoy_switches_per_request": median(t["envoy_switches"] for t in trials),
            "faults_per_request": median(t["faults"] for t in trials),
        }
        for key, trials in per_row.items()
    }
    if "floor" in per_row:
        for key, trials in per_row.items():
            summary[key]["x_floor"] = median(
                t["rps"] / f["rps"] for t, f in zip(trials, per_row["floor"], strict=True)
            )
    for key, trials in per_row.items():
        base = per_row.get(f"{key}@base")
        if base:
            # CPU per request over the same row run from the baseline tree, same rounds.
            summary[key]["cpu_x_baseline"] = median(
                t["cpu_us"] / b["cpu_us"] for t, b in zip(trials, base, strict=True)
            )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
