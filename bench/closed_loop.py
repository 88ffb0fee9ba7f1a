"""Throughput at fixed concurrency: `wrk` (closed loop) from Debian, installed when missing
(with redis-server, which the Redis row needs).

wrk is driven by a generated Lua script that sets the request and, when the run is done,
prints one JSON line with the totals and latency percentiles, so nothing parses wrk's
human-readable report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


class LoadGeneratorMissing(RuntimeError):
    """wrk or redis-server is not installed and could not be installed here."""


def ensure_tools() -> str:
    """The wrk binary. Installs Debian's wrk, and redis-server for the Redis row, when
    missing (apt-get update first); without root, says what to install instead."""
    missing = [
        pkg
        for pkg, binary in (("wrk", "wrk"), ("redis-server", "redis-server"))
        if not shutil.which(binary) and not os.path.exists(f"/usr/bin/{binary}")
    ]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *missing],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    found = shutil.which("wrk")
    if found and (shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")):
        return found
    raise LoadGeneratorMissing(
        f"not installed: {' '.join(missing)}; install them (Debian: sudo apt-get install "
        f"{' '.join(missing)}) and run the benchmark again"
    )


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    return found if found else ensure_tools()


def _lua_string(value: str | bytes) -> str:
    text = value.decode() if isinstance(value, bytes) else value
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


def write_script(path: Path, *, method: str, body: bytes, headers: dict[str, str]) -> Path:
    lines = [f"wrk.method = {_lua_string(method)}", f"wrk.body = {_lua_string(body)}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    lines.append("""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nWRK_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
""")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@dataclass(frozen=True)
class ClosedLoopResult:
    rps: float
    requests: int
    errors: int  # connect/read/write/timeout errors plus non-2xx/3xx answers
    p50_ms: float
    p99_ms: float


def run_wrk(
    url: str, script: Path, *, connections: int, seconds: float, threads: int = 1
) -> ClosedLoopResult:
    argv = [
        ensure_wrk(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=seconds + 30
    ).stdout
    line = next((x for x in out.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return ClosedLoopResult(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        requests=data["requests"],
        errors=errors,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )
