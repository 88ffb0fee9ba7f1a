"""The benchmark's rows as running processes: one Envoy per row, and behind it nothing, the
no-op floor, or a sidecar (SQLite, Redis, metering on, two workers). All rows run at the
same time, so the orchestrator can alternate between them round after round.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import yaml

from bench.envoy_variants import Variant, bench_envoy_config
from bench.policy import bench_config
from devtools.config import demo_key_env
from devtools.keys import DevIssuer
from devtools.procs import (
    LOOPBACK,
    ManagedProcess,
    free_port,
    start_envoy,
    start_redis,
    wait_for_port,
)
from devtools.stack import ADMIN_TOKEN, serve_argv, wait_ready

TREE = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RowSpec:
    key: str
    title: str
    backend: str  # "none", "floor", "sqlite", "redis"
    variant: Variant
    workers: int = 1
    # Another source tree whose `sidecar` package this row's sidecar runs (a baseline to
    # compare against in the same run); None: this checkout's.
    tree: Path | None = None
    # A floor that answers every Check with the sidecar's own allow for the benchmark
    # request (bench/noop_authz.py --answer): Envoy's cost of that answer, without deciding.
    answer: bool = False


@dataclass
class Row:
    spec: RowSpec
    url: str
    processes: list[ManagedProcess] = field(default_factory=list)

    @property
    def sidecar(self) -> ManagedProcess | None:
        return next((p for p in self.processes if p.name.startswith("sidecar")), None)


ROWS: tuple[RowSpec, ...] = (
    RowSpec("envoy", "Envoy alone (direct response)", "none", "envoy"),
    RowSpec("floor", "Envoy + no-op Python ext_authz (floor)", "floor", "authz"),
    RowSpec(
        "floor_answer",
        "Envoy + no-op ext_authz answering the sidecar's allow",
        "floor",
        "authz",
        answer=True,
    ),
    RowSpec("sqlite", "Envoy + sidecar, SQLite", "sqlite", "authz"),
    RowSpec("redis", "Envoy + sidecar, Redis", "redis", "authz"),
    RowSpec("metering", "Envoy + sidecar, SQLite, metering on", "sqlite", "full"),
    RowSpec("floor_full", "Envoy + no-op ext_authz, ext_proc, access log", "floor", "full"),
    RowSpec("sqlite_w2", "Envoy + sidecar, SQLite, --workers 2", "sqlite", "authz", workers=2),
)


def with_baseline(specs: list[RowSpec], tree: Path | None) -> list[RowSpec]:
    """`specs`, and with a baseline `tree` a twin of each sidecar row, `KEY@base`, that runs
    that tree's `sidecar` package with the same policy behind its own Envoy."""
    if tree is None:
        return specs
    tree = tree.resolve()
    return specs + [
        replace(s, key=f"{s.key}@base", title=f"{s.title} (baseline)", tree=tree)
        for s in specs
        if s.backend in ("sqlite", "redis")
    ]


def _sidecar(
    workdir: Path,
    name: str,
    config_path: Path,
    grpc_port: int,
    http_port: int,
    workers: int,
    tree: Path | None = None,
) -> ManagedProcess:
    argv = serve_argv(config_path, grpc_port, http_port, workers)
    # The policy injects the demo provider keys, read from the environment at load.
    env = {**os.environ, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN, **demo_key_env()}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return ManagedProcess(name, argv, workdir, env=env, cwd=workdir)


class Bench:
    """Starts every row's processes under one ExitStack; everything stops on exit."""

    def __init__(self, workdir: Path, stack: ExitStack, issuer: DevIssuer) -> None:
        self.workdir = workdir
        self.stack = stack
        self.issuer = issuer
        self.jwks = issuer.write_jwks(workdir / "jwks.json")
        self._redis_url: str | None = None
        # The redis-server the Redis rows share (its CPU is part of what a row costs).
        self.redis_process: ManagedProcess | None = None

    def redis_url(self) -> str:
        if self._redis_url is None:
            proc, port = start_redis(self.workdir / "redis")
            self.stack.enter_context(proc)
            self.redis_process = proc
            self._redis_url = f"redis://{LOOPBACK}:{port}/0"
        return self._redis_url

    def _sidecar_answer(self) -> Path:
        """The CheckResponse this checkout's sidecar answers the benchmark request with
        (one admitted Check in process: bench/check_loop.py --answer-to)."""
        path = self.workdir / "sidecar-answer.bin"
        argv = [sys.executable, "-m", "bench.check_loop", "--store", "sqlite"]
        subprocess.run([*argv, "--answer-to", str(path)], cwd=TREE, check=True)
        return path

    def _backend(self, spec: RowSpec) -> tuple[int, list[ManagedProcess]]:
        port = free_port()
        if spec.backend == "floor":
            argv = [sys.executable, "-m", "bench.noop_authz", "--port", str(port)]
            if spec.variant == "full":
                argv.append("--ext-proc")
            if spec.answer:
                argv += ["--answer", str(self._sidecar_answer())]
            proc = self.stack.enter_context(
                ManagedProcess(f"floor-{spec.key}", argv, self.workdir).start()
            )
            wait_for_port(LOOPBACK, port, 20, process=proc)
            return port, [proc]
        rowdir = self.workdir / spec.key
        rowdir.mkdir(parents=True, exist_ok=True)
        store = f"sqlite:///{rowdir}/sidecar.db" if spec.backend == "sqlite" else self.redis_url()
        config = bench_config(self.issuer, str(self.jwks), store)
        config_path = rowdir / "sidecar.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        http_port = free_port()
        proc = self.stack.enter_context(
            _sidecar(
                rowdir, f"sidecar-{spec.key}", config_path, port, http_port, spec.workers, spec.tree
            ).start()
        )
        wait_ready(f"http://{LOOPBACK}:{http_port}", proc, timeout=60)
        return port, [proc]

    def start(self, spec: RowSpec) -> Row:
        processes: list[ManagedProcess] = []
        grpc_port = 1
        if spec.backend != "none":
            grpc_port, processes = self._backend(spec)
        listen, admin = free_port(), free_port()
        config = bench_envoy_config(
            spec.variant,
            listen_port=listen,
            admin_port=admin,
            grpc_port=grpc_port,
            h2_max_streams=2 if spec.workers > 1 else None,
        )
        envoy, _ = start_envoy(self.workdir, config, base_id=listen)
        self.stack.enter_context(envoy)
        processes.append(envoy)
        return Row(spec, f"http://{LOOPBACK}:{listen}", processes)


def wait_answering(url: str, headers: dict[str, str], body: bytes, timeout: float = 30) -> None:
    """Until one benchmark request through the row's Envoy gets a 200."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            response = httpx.post(url, headers=headers, content=body, timeout=5)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:300]}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{url} never answered 200 (last: {last})")
