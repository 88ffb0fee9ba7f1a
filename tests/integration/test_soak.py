"""A bounded soak through Envoy: several clients, streamed and plain, for a fixed time; the
ledger's request count equals what the clients saw admitted, and its cost equals theirs."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.stack import Stack, running_stack

SECONDS = float(os.environ.get("SIDECAR_SOAK_SECONDS", "45"))
CENT = {"provider": "openai", "model": "flat-cent", "input_per_mtok": 0, "output_per_mtok": 10000}
CAP = {
    "name": "soak-cap",
    "budget_usd": 0.40,
    "window": {"fixed": "daily"},
    "split": ["user"],
    "filter": {"model": ["flat-*"]},
    "action": "block",
}


@pytest.fixture(scope="module")
def soak_stack(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("soak")
    jwks = str(issuer.write_jwks(workdir / "jwks.json"))
    config = demo_config(
        issuer,
        jwks,
        f"sqlite:///{workdir}/s.db",
        spend_limits=[CAP],
        pricing={"unknown_model": "reject", "overrides": [CENT]},
    )
    with running_stack(workdir, issuer, config) as stack:
        yield stack


def client_loop(
    stack: Stack,
    issuer: DevIssuer,
    user: str,
    stream: bool,
    deadline: float,
    seen: dict[str, list[int]],
) -> None:
    client = openai.OpenAI(
        base_url=stack.envoy_url + "/openai/v1",
        api_key=issuer.mint(user),
        max_retries=0,
        timeout=30,
    )
    outcomes = seen.setdefault(user, [])
    for _ in range(10_000):  # bounded whatever the clock does
        if time.monotonic() > deadline:
            return
        try:
            if stream:
                chunks = list(
                    client.chat.completions.create(
                        model="flat-cent",
                        max_tokens=1,
                        stream=True,
                        stream_options={"include_usage": True},
                        messages=[{"role": "user", "content": "soak"}],
                    )
                )
                assert chunks[-1].usage is not None
            else:
                client.chat.completions.create(
                    model="flat-cent", max_tokens=1, messages=[{"role": "user", "content": "soak"}]
                )
            outcomes.append(200)
        except openai.RateLimitError:
            outcomes.append(429)
            time.sleep(0.05)


def test_ledger_equals_what_clients_saw(soak_stack: Stack, issuer: DevIssuer) -> None:
    deadline = time.monotonic() + SECONDS
    seen: dict[str, list[int]] = {}
    users = [(f"soak{i}@example.com", i % 2 == 0) for i in range(6)]
    threads = [
        threading.Thread(
            target=client_loop, daemon=True, args=(soak_stack, issuer, user, stream, deadline, seen)
        )
        for user, stream in users
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SECONDS + 60)
    admitted = {user: outcomes.count(200) for user, outcomes in seen.items()}
    assert sum(admitted.values()) > 0
    # Every user hits their $0.40 cap: exactly 40 admitted each, never more.
    assert all(n == 40 for n in admitted.values()), admitted
    # The last commits land just after the last bytes reach the clients.
    deadline = time.monotonic() + 10
    while True:
        with soak_stack.admin() as admin:
            rows = admin.get("/v1/usage", params={"group_by": "user"}).json()["result"]
        ledger = {r["user"]: r for r in rows if r["user"].startswith("soak")}
        if time.monotonic() > deadline or all(
            ledger.get(u, {}).get("requests") == n for u, n in admitted.items()
        ):
            break
        time.sleep(0.2)
    for user, count in admitted.items():
        assert ledger[user]["requests"] == count, (user, ledger[user], count)
        assert round(ledger[user]["cost_usd"] * 100) == count
        assert ledger[user]["output_tokens"] == count


def test_metrics_agree_with_the_run(soak_stack: Stack) -> None:
    text = httpx.get(soak_stack.admin_url + "/metrics", timeout=5).text
    assert 'sidecar_decisions_total{reason="spend_limit_exceeded",result="deny"}' in text
