"""Waiting for what Envoy-side metering books: records arrive in batches after the answer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

from devtools.stack import Stack

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], timeout: float = 30.0, what: str = "") -> T:
    """The probe's first non-None answer; polling because the sidecar is another process."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or probe}")
        time.sleep(0.1)


def admin_get(stack: Stack, path: str, **params: str) -> Any:
    with stack.admin() as client:
        response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return json.loads(response.text, parse_float=Decimal)["result"]


def ledger_row(stack: Stack, user: str) -> dict[str, Any] | None:
    rows = admin_get(stack, "/v1/usage", group_by="user")
    return next((r for r in rows if r["user"] == user), None)


def charged(stack: Stack, user: str, requests: int = 1, timeout: float = 60.0) -> dict[str, Any]:
    """The user's ledger row once it holds `requests` settled requests."""

    def probe() -> dict[str, Any] | None:
        row = ledger_row(stack, user)
        return row if row is not None and row["requests"] >= requests else None

    return eventually(probe, timeout, what=f"{requests} charged request(s) for {user}")
