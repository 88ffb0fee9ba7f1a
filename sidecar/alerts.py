"""Spend alerts: each threshold fires once per bucket per window, across every replica.

Firing is decided off the request path: the decision only notes which thresholds the new
utilisation crossed; a background task claims each one in the store (compare-and-set, so one
replica wins), then logs, counts, and posts signed webhooks with retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import httpx
import structlog

from sidecar.config.ruleset import RuleSetHolder
from sidecar.metrics import ALERTS_SENT, WEBHOOK_FAILURES
from sidecar.policy.rules import in_unit
from sidecar.settings import SettingsHolder
from sidecar.store.base import DocumentStore
from sidecar.store.budget_types import BucketState

if TYPE_CHECKING:
    from sidecar.admission.plan import Plan


log = structlog.get_logger("sidecar.alerts")
COLLECTION = "alerts_fired"
SIGNATURE_HEADER = "x-sidecar-signature"
RETRY_DELAYS = (0.5, 2.0, 8.0)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """`t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`: the timestamp is signed too, so a
    captured delivery cannot be replayed later as a fresh one."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


class Alerts:
    def __init__(
        self,
        store: DocumentStore,
        holder: RuleSetHolder,
        clock: Callable[[], float] = time.time,
        post: Callable[[str, bytes, dict[str, str]], Any] | None = None,
        settings: SettingsHolder | None = None,
    ) -> None:
        self._store = store
        self._holder = holder
        self._settings = settings or SettingsHolder(holder)
        self._clock = clock
        self._post = post
        # Claims this process already made or lost: no store call for them again.
        self._seen: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent: list[dict[str, Any]] = []

    def observe(self, budget: Plan, states: Sequence[BucketState], now: float) -> None:
        for planned in budget.alerting:
            rule = planned.rule
            state = budget.state(planned, states)
            used = state.spent + state.reserved
            percent = used * 100 // rule.limit
            for threshold in rule.alerts:
                if threshold > percent:
                    break
                window = rule.window.window_id(now)
                key = f"{rule.name}|{planned.view.key}|{window}|{threshold}"
                if key in self._seen:
                    continue
                self._seen.add(key)
                unit = rule.unit
                event = {
                    "type": "spend_alert",
                    "rule": rule.name,
                    "bucket": planned.bucket_label,
                    "threshold_percent": threshold,
                    "used_percent": int(percent),
                    "unit": unit,
                    "spent": in_unit(unit, state.spent),
                    "reserved": in_unit(unit, state.reserved),
                    "limit": in_unit(unit, rule.limit),
                    "window": window,
                    "action": rule.action,
                    "at": int(now),
                }
                ttl = rule.window.ttl_seconds()
                self._spawn(self._fire(key, event, ttl))
        if len(self._seen) > 100_000:
            self._seen.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fire(self, key: str, event: dict[str, Any], ttl: int) -> None:
        try:
            won = await self._store.swap_doc(
                COLLECTION, key, None, event, ttl_seconds=ttl, now=self._clock()
            )
        except Exception as exc:
            self._seen.discard(key)  # try again on a later request
            log.warning("alert_claim_failed", error=str(exc))
            return
        if not won:
            return
        log.warning("spend_alert", **event)
        ALERTS_SENT.labels(event["rule"], str(event["threshold_percent"])).inc()
        self.sent.append(event)
        for hook in self._holder.current.config.alerts.webhooks:
            secret = self._settings.current.webhook_secrets.get(hook.secret_env or "", "")
            self._spawn(self._deliver(hook.url, event, secret))

    async def _deliver(self, url: str, event: dict[str, Any], secret: str) -> None:
        body = json.dumps(event, separators=(",", ":")).encode()
        headers = {"content-type": "application/json", "user-agent": "llm-spend-sidecar"}
        if secret:
            headers[SIGNATURE_HEADER] = sign(secret, int(self._clock()), body)
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS)):
            await asyncio.sleep(delay)
            try:
                if self._post is not None:
                    await self._post(url, body, headers)
                    return
                async with httpx.AsyncClient(timeout=5.0) as client:
                    response = await client.post(url, content=body, headers=headers)
                if response.status_code < 300:
                    return
                log.warning(
                    "alert_webhook_status",
                    url=url,
                    status=response.status_code,
                    attempt=attempt + 1,
                )
            except Exception as exc:
                log.warning("alert_webhook_failed", url=url, error=str(exc), attempt=attempt + 1)
        WEBHOOK_FAILURES.inc()

    async def drain(self, timeout: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
