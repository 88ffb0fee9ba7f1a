"""`sidecar serve --workers N`: N worker processes sharing the gRPC and HTTP ports.

Why processes: a decision is Python work under one GIL, so one process uses one core at
most. Each worker is a whole `sidecar serve` (its own event loop, store connection and
caches), started as a fresh interpreter; the budget stores are already safe for several
processes (SQLite serializes writers with BEGIN IMMEDIATE, Redis runs Lua scripts).

Ports: every worker binds the same gRPC and HTTP addresses with SO_REUSEPORT (grpc.aio's
`grpc.so_reuseport` option, and a pre-bound socket handed to uvicorn), and the kernel
spreads *connections* over them. Envoy keeps few long-lived HTTP/2 connections to the
sidecar (one per Envoy worker thread), so with as many connections as workers one worker
may get them all; cap `max_concurrent_streams` on the sidecar cluster to make Envoy open
more (the benchmark's `--workers 2` row uses 2).

The parent only supervises: it forwards SIGTERM, SIGINT and SIGHUP to every worker, waits
for them to drain, and restarts a worker that dies (with a growing delay when one keeps
dying at start). `/metrics` sums every worker: the parent points PROMETHEUS_MULTIPROC_DIR
at a fresh directory before any worker imports prometheus_client, so counters and
histograms are kept in per-process files that any worker's `/metrics` adds up. Every log
line of a worker carries `worker` (its index) and `pid`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("sidecar.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_ENV = "SIDECAR_WORKER_ID"
# A worker that dies sooner than this after starting is "crashing at start".
_EARLY_EXIT_SECONDS = 5.0
_MAX_BACKOFF_SECONDS = 30.0
_GIVE_UP_AFTER = 4
# Workers have DRAIN_SECONDS (10) to finish in-flight calls; this covers it with margin.
_STOP_TIMEOUT_SECONDS = 20.0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def reuseport_socket(address: str) -> socket.socket:
    """A listening TCP socket on `address` that other processes may bind as well."""
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


@dataclass
class _Worker:
    index: int
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    early_exits: int = 0
    restart_at: float | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env)
        self.started_at = time.monotonic()
        self.restart_at = None
        log.info("worker_started", worker=self.index, pid=self.process.pid)

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)


@dataclass
class _Supervisor:
    workers: list[_Worker]
    multiproc_dir: Path
    pending: list[int] = field(default_factory=list)

    def on_signal(self, signum: int, frame: Any) -> None:
        self.pending.append(signum)

    def run(self) -> int:
        for worker in self.workers:
            worker.start()
        while True:
            while self.pending:
                signum = self.pending.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    return self.stop(signum)
                for worker in self.workers:  # SIGHUP: each worker reloads its config
                    worker.signal(signum)
            self._reap()
            if all(w.early_exits >= _GIVE_UP_AFTER for w in self.workers):
                # Not one worker gets past start-up (port taken, store unreachable, config
                # broken since): say so instead of restarting forever.
                log.error("workers_keep_failing", attempts=_GIVE_UP_AFTER)
                self.stop(signal.SIGTERM)
                return 1
            time.sleep(0.1)

    def _reap(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            process = worker.process
            if worker.restart_at is not None:
                if now >= worker.restart_at:
                    worker.start()
                continue
            if process is None or process.poll() is None:
                continue
            self._forget(process.pid)
            early = now - worker.started_at < _EARLY_EXIT_SECONDS
            worker.early_exits = worker.early_exits + 1 if early else 0
            delay = min(_MAX_BACKOFF_SECONDS, 0.5 * 2**worker.early_exits) if early else 0.0
            log.error(
                "worker_exited",
                worker=worker.index,
                pid=process.pid,
                code=process.returncode,
                restart_in_seconds=delay,
            )
            worker.restart_at = now + delay

    def _forget(self, pid: int) -> None:
        # A dead worker's counters stay in its files and keep counting in the sums, as a
        # counter must; only its live-gauge state goes.
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
            pid, str(self.multiproc_dir)
        )

    def stop(self, signum: int) -> int:
        log.info("workers_stopping", signal=signal.Signals(signum).name)
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT_SECONDS
        code = 0
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker_killed", worker=worker.index, pid=worker.process.pid)
                worker.process.kill()
                worker.process.wait()
                code = 1
        log.info("workers_stopped")
        return code


def run_workers(
    config_path: Path, grpc_addr: str | None, http_addr: str | None, n: int, log_level: str
) -> int:
    """Run `n` workers until SIGTERM/SIGINT; 0 when they all stopped cleanly."""
    from sidecar.config.loader import load_config

    listen = load_config(config_path).listen  # ConfigError goes to the caller, as for one
    grpc_addr = grpc_addr or listen.grpc
    http_addr = http_addr or listen.http
    for address in (grpc_addr, http_addr):
        if split_address(address)[1] == 0:
            print(f"sidecar: {address}: workers share one port, so it cannot be 0", file=sys.stderr)
            return 2
    multiproc_dir = Path(tempfile.mkdtemp(prefix="sidecar-metrics-"))
    env = {**os.environ, MULTIPROC_ENV: str(multiproc_dir)}
    workers = [
        _Worker(
            i,
            [
                sys.executable,
                "-m",
                "sidecar.workers",
                "--config",
                str(config_path),
                "--grpc",
                grpc_addr,
                "--http",
                http_addr,
                "--log-level",
                log_level,
            ],
            {**env, WORKER_ENV: str(i)},
        )
        for i in range(n)
    ]
    supervisor = _Supervisor(workers, multiproc_dir)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, supervisor.on_signal)
    log.info(
        "workers_starting",
        workers=n,
        grpc=grpc_addr,
        http=http_addr,
        metrics_dir=str(multiproc_dir),
    )
    try:
        return supervisor.run()
    finally:
        shutil.rmtree(multiproc_dir, ignore_errors=True)


def _worker_main(argv: list[str] | None = None) -> int:
    """One worker: `sidecar serve` on shared ports (started by run_workers, not by hand)."""
    from sidecar import event_loop
    from sidecar.log import configure
    from sidecar.server import serve

    parser = argparse.ArgumentParser(prog="sidecar-worker")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--http", required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    configure(
        args.log_level, static={"worker": int(os.environ.get(WORKER_ENV, "0")), "pid": os.getpid()}
    )
    sock = reuseport_socket(args.http)
    event_loop.run(serve(args.config, args.grpc, args.http, http_sockets=[sock], shared_store=True))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
