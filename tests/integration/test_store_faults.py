"""Store failures under load: Redis killed and brought back, the sidecar SIGKILLed."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.procs import start_redis
from devtools.stack import Stack, running_stack, sidecar_process, wait_ready
from sidecar.store.sqlite_journal import Journal

CHAT = "/openai/v1/chat/completions"
CENT = {"provider": "openai", "model": "flat-cent", "input_per_mtok": 0, "output_per_mtok": 10000}
TOTAL = {
    "name": "total",
    "budget_usd": 1000,
    "window": {"fixed": "daily"},
    "filter": {"model": ["flat-*"]},
    "action": "block",
}


def config(issuer: DevIssuer, workdir: Path, store: Any) -> dict[str, Any]:
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    return demo_config(
        issuer,
        jwks,
        store,
        spend_limits=[TOTAL],
        pricing={"unknown_model": "reject", "overrides": [CENT]},
        admission={"reservation_ttl": "3s"},
    )


class Load:
    """A bounded closed loop of cent requests in a thread; remembers every status."""

    def __init__(self, stack: Stack, token: str) -> None:
        self.stack, self.token = stack, token
        self.statuses: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            for _ in range(5000):  # bounded whatever happens
                if self.stop.is_set():
                    return
                try:
                    response = client.post(
                        self.stack.envoy_url + CHAT,
                        headers={"authorization": f"Bearer {self.token}"},
                        json={"model": "flat-cent", "max_tokens": 1, "messages": []},
                    )
                    self.statuses.append(response.status_code)
                except httpx.HTTPError:
                    self.statuses.append(0)
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def spent(stack: Stack, token: str) -> float:
    rows = httpx.get(
        stack.admin_url + "/v1/budgets/me",
        params={"model": "flat-cent"},
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    ).json()["result"]
    total = next(r for r in rows if r["rule"] == "total")
    return float(total["spent"] + total["reserved"])


def wait_until(predicate: Any, timeout: float, what: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s" + (f": {what()}" if what else ""))


@pytest.fixture
def redis_dir(tmp_path: Path) -> Path:
    return tmp_path / "redis"


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
def test_redis_killed_under_load_and_restarted(
    tmp_path: Path, issuer: DevIssuer, redis_dir: Path, on_error: str
) -> None:
    redis, port = start_redis(redis_dir, durable=True)
    token = issuer.mint(f"{on_error}@example.com")
    store = {
        "url": f"redis://127.0.0.1:{port}/0",
        "on_error": on_error,
        "spool": str(tmp_path / "spool.db"),
    }
    try:
        with running_stack(tmp_path / "stack", issuer, config(issuer, tmp_path, store)) as stack:
            with Load(stack, token) as load:
                wait_until(lambda: load.statuses.count(200) >= 20, 30)
                before = len(load.statuses)
                redis.stop()
                time.sleep(2.0)
                during = Counter(load.statuses[before:])
                redis, _ = start_redis(redis_dir, port=port, durable=True)
                restarted = len(load.statuses)
                wait_until(lambda: load.statuses[restarted:].count(200) >= 20, 30)
            statuses = Counter(load.statuses)
            assert statuses[0] == 0, "the sidecar or Envoy dropped connections"
            if on_error == "fail_closed":
                # Only requests already in flight at the kill can still succeed.
                assert during[503] > 5 * during[200] and during[200] <= 10, during
                assert set(statuses) <= {200, 503}
            else:
                assert during[200] > 5 and during[503] == 0, during
                assert set(statuses) == {200}
            # Every admitted request costs exactly one cent; once the spool has drained and
            # reservations are settled, the store holds exactly that: none lost, none twice.
            admitted = statuses[200]
            wait_until(
                lambda: round(spent(stack, token) * 100) == admitted,
                30,
                lambda: (
                    f"{spent(stack, token)} USD held or spent for {admitted} "
                    f"admitted ({dict(statuses)})"
                ),
            )
            time.sleep(1.5)
            assert round(spent(stack, token) * 100) == admitted
    finally:
        redis.stop()


def test_sidecar_sigkill_keeps_committed_charges(tmp_path: Path, issuer: DevIssuer) -> None:
    workdir = tmp_path / "stack"
    db = f"sqlite:///{workdir}/s.db"
    with running_stack(workdir, issuer, config(issuer, tmp_path, db)) as stack:
        token = issuer.mint("kill@example.com")
        with Load(stack, token) as load:
            wait_until(lambda: load.statuses.count(200) >= 30, 30)
            sidecar = stack.sidecars[0]
            sidecar._require_started().kill()  # SIGKILL: no drain, no flush
            sidecar._require_started().wait(10)
            load.stop.set()
        seen_ok = load.statuses.count(200)
        # The process owned the file: its latest reservations were in its journal, not
        # yet in the file, when it was killed.
        with sqlite3.connect(workdir / "s.db") as connection:
            in_file = connection.execute("SELECT COUNT(*) FROM reservations").fetchone()[0]
        journaled = sum(
            len(Journal.read(segment)) for segment in Journal(str(workdir / "s.db")).segments()
        )
        grpc_port = stack.grpc_port
        http_port = int(stack.admin_url.rsplit(":", 1)[1])
        restarted = sidecar_process(
            workdir, "sidecar-restarted", stack.config_path, grpc_port, http_port
        ).start()
        with restarted:
            wait_ready(stack.admin_url, restarted)
            # Every reservation the killed process made must be charged exactly once,
            # including those whose response never reached the client: count what reached
            # the database once the restarted process replayed the journal (a log line
            # written after the reservation can be cut off by the kill).
            with sqlite3.connect(workdir / "s.db") as connection:
                admitted = connection.execute("SELECT COUNT(*) FROM reservations").fetchone()[0]
            assert in_file <= admitted <= in_file + journaled
            assert seen_ok <= admitted <= seen_ok + 5
            assert Journal(str(workdir / "s.db")).segments() == []

            # Committed charges survived; open reservations are charged their estimate
            # (one cent each here) when their 3 s TTL ends, so the total is exact.
            def settled() -> dict[str, Any]:
                rows = httpx.get(
                    stack.admin_url + "/v1/budgets/me",
                    params={"model": "flat-cent"},
                    headers={"authorization": f"Bearer {token}"},
                    timeout=10,
                ).json()["result"]
                return dict(next(r for r in rows if r["rule"] == "total"))

            wait_until(lambda: settled()["reserved"] == 0, 20)
            total = settled()
            assert round(total["spent"] * 100) == admitted
