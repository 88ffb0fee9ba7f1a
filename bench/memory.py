"""Resident memory of one sidecar worker after many distinct users: the real server, fed
ext_authz Checks over gRPC, each from a user with its own freshly minted RS256 JWT.

    .venv/bin/python -m bench.memory                 # 100,000 users, about 3 minutes
    .venv/bin/python -m bench.memory --users 20000   # quicker
    .venv/bin/python -m bench.memory --users 10000 --rate-rules   # + rolling 1m rpm/tpm
    .venv/bin/python -m bench.memory --charged       # every call also metered and charged

Without `--charged` every Check's reservation stays open (the benchmark sends no metering
record and the policy's TTL is an hour): 100,000 calls in flight at once. With it, each
batch of Checks is followed by one access log message holding a finished stream's
metering record per admitted call, as Envoy sends them, so the calls end as real ones do
and what stays is what each user leaves behind.

What grows with users: the verified-token cache (bounded, 10,000 entries), cached plans
(bounded, 1,024), per-user budget buckets and, with the SQLite file owned by the process
(the default), the holds of open reservations and the buckets read, in the process. Tokens are
minted by two helper processes (RSA signing is the slow part) and streamed to the client,
so neither the tokens nor the client live in the measured process. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml
from cryptography.hazmat.primitives import serialization
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from bench.machine import rss_mb
from bench.policy import BODY, GROUPS, PATH, bench_config, spend_limits
from devtools.keys import DevIssuer
from devtools.procs import LOOPBACK, free_port
from devtools.stack import sidecar_process, wait_ready

RESULTS = Path(__file__).resolve().parent / "results"
# Request and token limits over a 1-minute rolling window, one bucket per caller (a split
# on `user` buckets the bench's JWT callers exactly as `token` buckets service tokens).
RATE_RULES: list[dict[str, Any]] = [
    {"name": "caller-rpm", "requests": 600, "window": {"rolling": "1m"}, "split": ["user"]},
    {"name": "caller-tpm", "tokens": 2_000_000, "window": {"rolling": "1m"}, "split": ["user"]},
]
_CHUNK = 250
_CONCURRENCY = 16
_issuer: DevIssuer | None = None


def _init_minter(pem: bytes, kid: str, iss: str, aud: str) -> None:
    global _issuer
    key = serialization.load_pem_private_key(pem, password=None)
    _issuer = DevIssuer(iss, aud, key, kid)  # type: ignore[arg-type]


def _mint(first: int) -> list[str]:
    assert _issuer is not None
    return [
        _issuer.mint(f"user{n:06d}@example.com", GROUPS, ttl=6 * 3600)
        for n in range(first, first + _CHUNK)
    ]


def _request(token: str, n: int) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.raw_body = "POST", PATH, BODY
    http.headers["cf-access-jwt-assertion"] = token
    http.headers["x-request-id"] = f"mem-{n}"
    return request


def _reservation(reply: external_auth_pb2.CheckResponse) -> str:
    for option in reply.ok_response.headers:
        if option.header.key == "x-sidecar-request-id":
            return str(option.header.value)
    raise RuntimeError(f"no reservation in {reply}")


def _records(reservations: list[str]) -> als_pb2.StreamAccessLogsMessage:
    """The access log message Envoy sends when these calls' streams have finished."""
    from bench.charge_path import _body, _entry

    body = _body(4)
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend(_entry(rid, body) for rid in reservations)
    return message


async def _drive(
    port: int,
    tokens: Iterator[list[str]],
    pid: int,
    users: int,
    every: int,
    charged: bool = False,
) -> list[tuple[int, float]]:
    samples: list[tuple[int, float]] = []
    sent = 0
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        meter = als_pb2_grpc.AccessLogServiceStub(channel)
        for chunk in tokens:
            for start in range(0, len(chunk), _CONCURRENCY):
                batch = chunk[start : start + _CONCURRENCY]
                replies = await asyncio.gather(
                    *(stub.Check(_request(t, sent + i), timeout=30) for i, t in enumerate(batch))
                )
                for reply in replies:
                    if reply.status.code != 0:
                        raise RuntimeError(f"check refused: {reply}")
                if charged:
                    message = _records([_reservation(reply) for reply in replies])
                    await meter.StreamAccessLogs(iter([message]), timeout=30)
                sent += len(batch)
                if sent % every == 0 or sent == users:
                    samples.append((sent, rss_mb(pid)))
            if sent >= users:
                break
    return samples


def _committed(http_port: int) -> float:
    text = httpx.get(f"http://{LOOPBACK}:{http_port}/metrics", timeout=10).text
    name = 'sidecar_metering_commits_total{status="committed"} '
    return sum(float(line[len(name) :]) for line in text.splitlines() if line.startswith(name))


def measure(users: int, rate_rules: bool = False, charged: bool = False) -> dict[str, Any]:
    issuer = DevIssuer.generate()
    pem = issuer.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with tempfile.TemporaryDirectory(prefix="sidecar-memory-") as tmp:
        workdir = Path(tmp)
        jwks = issuer.write_jwks(workdir / "jwks.json")
        config_path = workdir / "sidecar.yaml"
        config_path.write_text(
            yaml.safe_dump(
                bench_config(
                    issuer,
                    str(jwks),
                    f"sqlite:///{workdir}/sidecar.db",
                    rules=[*spend_limits(), *RATE_RULES] if rate_rules else None,
                )
            )
        )
        grpc_port, http_port = free_port(), free_port()
        # Decision lines are part of the work but not of the memory: keep them off the disk.
        with sidecar_process(
            workdir,
            "sidecar",
            config_path,
            grpc_port,
            http_port,
            env={"SIDECAR_LOG_LEVEL": "warning"},
        ).start() as proc:
            wait_ready(f"http://{LOOPBACK}:{http_port}", proc, timeout=60)
            warm = [issuer.mint("warmup@example.com", GROUPS)] * 200
            asyncio.run(_drive(grpc_port, iter([warm]), proc.pid, 200, 200))
            before = rss_mb(proc.pid)
            started = time.monotonic()
            context = multiprocessing.get_context("spawn")
            with context.Pool(
                2, _init_minter, (pem, issuer.kid, issuer.issuer, issuer.audience)
            ) as pool:
                chunks = pool.imap(_mint, range(0, users, _CHUNK))
                samples = asyncio.run(
                    _drive(
                        grpc_port,
                        chunks,
                        proc.pid,
                        users,
                        every=max(_CHUNK, users // 10 // _CHUNK * _CHUNK),
                        charged=charged,
                    )
                )
            if charged:  # the last charges are committed (every one, or the run is wrong)
                deadline = time.monotonic() + 60
                while _committed(http_port) < users and time.monotonic() < deadline:
                    time.sleep(0.2)
                if _committed(http_port) < users:
                    raise RuntimeError(f"{_committed(http_port)} of {users} calls charged")
            seconds = time.monotonic() - started
            after = rss_mb(proc.pid)
    return {
        "users": users,
        "rate_rules": rate_rules,
        "charged": charged,
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "samples": [{"users": u, "rss_mb": round(r, 1)} for u, r in samples],
        "seconds": round(seconds, 1),
        "pid_note": "RSS of the one sidecar process (VmRSS)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument(
        "--out",
        type=Path,
        help="where to keep the result (default bench/results/memory.json, which bench.run's "
        "table shows, or memory_charged.json with --charged)",
    )
    parser.add_argument(
        "--rate-rules",
        action="store_true",
        help="add per-caller requests and tokens limits over a rolling minute",
    )
    parser.add_argument(
        "--charged",
        action="store_true",
        help="meter and charge every call (each batch's records sent as Envoy sends them)",
    )
    args = parser.parse_args(argv)
    result = measure(args.users, args.rate_rules, args.charged)
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = json.dumps(result, indent=2)
    out: Path = args.out or RESULTS / ("memory_charged.json" if args.charged else "memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
