"""The whole product on loopback, for the demo and the integration tests: a fake provider,
one or more sidecar processes, and Envoy in front of the first."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from devtools import harness_env
from devtools.config import DEMO_PROVIDER_KEYS, demo_key_env
from devtools.envoy_config import SidecarMtls, render_envoy_config
from devtools.keys import DevIssuer
from devtools.procs import LOOPBACK, ManagedProcess, free_port, start_envoy, wait_for_port
from sidecar.envoy.attach import DEFAULT_MAX_CHECKS

# Only ever used on loopback by the demo and tests; real deployments set their own.
ADMIN_TOKEN = "local-admin-token-0123456789"
# Ditto: the key that seals device login's secrets in the demo's store.
DEMO_SECRET_KEY = "bG9jYWwtZGVtby1zZWNyZXQta2V5LTAxMjM0NTY3ODk="


def serve_argv(
    config_path: Path, grpc_port: int, http_port: int, workers: int | None = None
) -> list[str]:
    """`sidecar serve` on loopback, run by this interpreter (the checkout's code on its path)."""
    argv = [sys.executable, "-m", "sidecar.cli", "serve", "--config", str(config_path)]
    argv += ["--grpc", f"{LOOPBACK}:{grpc_port}", "--http", f"{LOOPBACK}:{http_port}"]
    return argv if workers is None else [*argv, "--workers", str(workers)]


def sidecar_process(
    workdir: Path,
    name: str,
    config_path: Path,
    grpc_port: int,
    http_port: int,
    env: dict[str, str] | None = None,
) -> ManagedProcess:
    argv = serve_argv(config_path, grpc_port, http_port)
    full_env = {
        **os.environ,
        "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN,
        "SIDECAR_SECRET_KEY": DEMO_SECRET_KEY,
        **demo_key_env(),
        **(env or {}),
    }
    return ManagedProcess(name, argv, workdir, env=full_env, cwd=workdir)


def fake_provider_process(
    workdir: Path,
    port: int,
    provider_keys: Mapping[str, Sequence[str]] | None = None,
    replay_dir: Path | None = None,
) -> ManagedProcess:
    """The fake provider on `LOOPBACK:port` (not started); `provider_keys`: the keys it
    accepts per provider (none: it accepts any call)."""
    key_args = [
        f"--key={name}={key}" for name, keys in (provider_keys or {}).items() for key in keys
    ]
    argv = [
        sys.executable,
        "-m",
        "devtools.fake_provider",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        *key_args,
        *(["--replay-dir", str(replay_dir)] if replay_dir is not None else []),
    ]
    return ManagedProcess("fake-provider", argv, workdir, env=harness_env())


def wait_ready(url: str, process: ManagedProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_running():
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        try:
            if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{process.name} not ready after {timeout}s:\n{process.log_tail()}")


@dataclass
class Stack:
    workdir: Path
    issuer: DevIssuer
    config_path: Path
    envoy_url: str
    admin_url: str
    provider_url: str
    grpc_port: int
    sidecars: list[ManagedProcess] = field(default_factory=list)
    admin_token: str = ADMIN_TOKEN
    # Envoy's admin interface (its /stats: what the access log wrote and dropped).
    envoy_admin_url: str = ""

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
        )

    def write_config(self, config: dict[str, Any]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.replace(self.config_path)

    def seen(self) -> list[dict[str, Any]]:
        return list(httpx.get(self.provider_url + "/_seen", timeout=5).json()["requests"])

    def clear_seen(self) -> None:
        httpx.delete(self.provider_url + "/_seen", timeout=5)


def add_sidecar_endpoints(config: dict[str, Any], first_port: int, ports: list[int]) -> None:
    """Spread Envoy's checks over several sidecar replicas (round robin)."""
    if not ports:
        return
    for cluster in config["static_resources"]["clusters"]:
        for group in cluster.get("load_assignment", {}).get("endpoints", []):
            endpoints = group["lb_endpoints"]
            address = endpoints[0]["endpoint"]["address"]["socket_address"]
            if address.get("port_value") == first_port:
                for port in ports:
                    endpoints.append(
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": LOOPBACK, "port_value": port}
                                }
                            }
                        }
                    )


def max_checks_for(config: Mapping[str, Any], processes: int) -> int:
    """Envoy's bound on Checks in flight for `processes` sidecars running `config`."""
    overload = config.get("overload") or {}
    return int(overload.get("max_inflight", DEFAULT_MAX_CHECKS)) * processes


@contextmanager
def running_stack(
    workdir: Path,
    issuer: DevIssuer,
    config: dict[str, Any],
    extra_sidecars: int = 0,
    http_port: int | None = None,
    sidecar_mtls: SidecarMtls | None = None,
    provider_keys: Mapping[str, Sequence[str]] | None = None,
    replay_dir: Path | None = None,
    provider_argv: Sequence[str] | None = None,
    max_checks: int | None = None,
) -> Iterator[Stack]:
    """Fake provider, 1 + extra_sidecars sidecar processes, and Envoy in front of the first.

    `http_port` fixes the first sidecar's HTTP port, for configs that must name their own
    URL (device login's `public_url`) before the process starts. `provider_keys`: the keys
    the fake provider accepts per provider (default: the demo keys the sidecar injects).
    `replay_dir` lets the fake provider answer with recorded responses (`x-fake-replay`).
    `provider_argv`: another upstream to run instead of the fake provider, given
    `--port PORT` (a benchmark's leaner one). `max_checks`: the Checks Envoy lets be in
    flight to the sidecars; by default what `sidecar envoy-config` derives from the config
    (`overload.max_inflight` per sidecar process).
    """
    if provider_keys is None:
        provider_keys = {name: (key,) for name, key in DEMO_PROVIDER_KEYS.items()}
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    with ExitStack() as stack:
        provider_port = free_port()
        if provider_argv is None:
            upstream = fake_provider_process(workdir, provider_port, provider_keys, replay_dir)
        else:
            argv = [*provider_argv, "--port", str(provider_port)]
            upstream = ManagedProcess("fake-provider", argv, workdir, env=harness_env())
        provider = stack.enter_context(upstream.start())
        wait_for_port(LOOPBACK, provider_port, 20, process=provider)
        sidecars = []
        grpc_port = free_port()
        http_port = http_port or free_port()
        ports = [(grpc_port, http_port)] + [
            (free_port(), free_port()) for _ in range(extra_sidecars)
        ]
        for i, (g, h) in enumerate(ports):
            proc = stack.enter_context(
                sidecar_process(workdir, f"sidecar-{i}", config_path, g, h).start()
            )
            sidecars.append(proc)
        for proc, (_, h) in zip(sidecars, ports, strict=True):
            wait_ready(f"http://{LOOPBACK}:{h}", proc)
        listen, admin = free_port(), free_port()
        envoy_config = render_envoy_config(
            listen_port=listen,
            admin_port=admin,
            sidecar_grpc=(LOOPBACK, grpc_port),
            provider_upstream=(LOOPBACK, provider_port),
            sidecar_mtls=sidecar_mtls,
            max_checks=max_checks or max_checks_for(config, 1 + extra_sidecars),
        )
        add_sidecar_endpoints(envoy_config, grpc_port, [g for g, _ in ports[1:]])
        envoy, _ = start_envoy(workdir, envoy_config, base_id=listen)
        stack.enter_context(envoy)
        yield Stack(
            workdir,
            issuer,
            config_path,
            f"http://{LOOPBACK}:{listen}",
            f"http://{LOOPBACK}:{http_port}",
            f"http://{LOOPBACK}:{provider_port}",
            grpc_port,
            sidecars,
            envoy_admin_url=f"http://{LOOPBACK}:{admin}",
        )
