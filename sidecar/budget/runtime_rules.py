"""Rules set at run time through the admin API, persisted in the store beside the file rules:
`/v1/spend-limits`, the account spending limit and the spending caps.

Every process keeps a compiled copy, refreshed from the store every second (and at once
after its own writes), so the request path never reads rules from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from sidecar.config.models import SpendLimitConfig
from sidecar.config.ruleset import rules_from_config
from sidecar.money import cents_to_micros
from sidecar.policy.rules import Action, Rule, Window, compile_rule
from sidecar.policy.windows import FixedWindow, RollingWindow
from sidecar.store.base import DocumentStore

log = structlog.get_logger("sidecar.rules")

SPEND_LIMITS = "spend_limits"
ACCOUNT_LIMIT = "account_spending_limit"
SPENDING_CAPS = "spending_caps"
# The account-wide buckets share these names with the always-on tracking buckets below, so
# a limit set today counts the spend already made in its window.
ACCOUNT_RULE = "account"
_DAY = 86_400
SLIDING_SECONDS = {"daily": _DAY, "weekly": 7 * _DAY, "monthly": 30 * _DAY}


def account_window(duration: str, strategy: str) -> FixedWindow | RollingWindow:
    if strategy == "sliding":
        return RollingWindow(SLIDING_SECONDS[duration])
    return FixedWindow(duration, "UTC")  # type: ignore[arg-type]


def _account_rule(limit: int, window: Window, action: Action, alerts: tuple[int, ...] = ()) -> Rule:
    """A rule on the whole account: no filters, one bucket, set at runtime."""
    return compile_rule(
        name=ACCOUNT_RULE,
        limit=limit,
        window=window,
        filters={},
        split=(),
        action=action,
        alerts=alerts,
        source="runtime",
    )


def account_tracking_rules() -> tuple[Rule, ...]:
    """Monitor-only account buckets for every window the account APIs can ask about."""
    return tuple(
        _account_rule(0, account_window(d, s), "monitor")
        for d in ("daily", "weekly", "monthly")
        for s in ("fixed", "sliding")
    )


def account_limit_rule(doc: dict[str, Any]) -> Rule:
    window = account_window(doc["duration"], doc["strategy"])
    return _account_rule(cents_to_micros(int(doc["amount"])), window, "block")


def caps_rules(doc: dict[str, Any]) -> list[Rule]:
    rules = []
    monthly = FixedWindow("monthly", "UTC")
    cap = doc.get("hard_spending_cap")
    if cap is not None and doc.get("hard_cap_enabled"):
        rules.append(_account_rule(cents_to_micros(int(cap)), monthly, "block"))
    budget = doc.get("monthly_spending_budget")
    if budget is not None and doc.get("spending_alerts_enabled"):
        alerts = tuple(doc.get("spending_alert_thresholds", ()))
        rules.append(_account_rule(cents_to_micros(int(budget)), monthly, "monitor", alerts))
    return rules


class RuntimeRules:
    def __init__(
        self, store: DocumentStore, account_id: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._clock = clock
        self.account_id = account_id
        self._rules: tuple[Rule, ...] = account_tracking_rules()
        self.docs: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    def __call__(self) -> Sequence[Rule]:
        return self._rules

    async def refresh(self) -> None:
        now = self._clock()
        docs = await self._store.list_docs(SPEND_LIMITS, now=now)
        compiled: list[Rule] = list(account_tracking_rules())
        for doc in docs:
            try:
                compiled.extend(
                    rules_from_config(SpendLimitConfig.model_validate(doc), source="runtime")
                )
            except ValueError as exc:  # a rule written by a newer version: skip, loudly
                log.error("runtime_rule_invalid", name=doc.get("name"), error=str(exc))
        limit = await self._store.get_doc(ACCOUNT_LIMIT, self.account_id, now=now)
        if limit is not None:
            compiled.append(account_limit_rule(limit))
        caps = await self._store.get_doc(SPENDING_CAPS, self.account_id, now=now)
        if caps is not None:
            compiled.extend(caps_rules(caps))
        self.docs = docs
        rules = tuple(compiled)
        # Unchanged rules stay the very same objects: the engine's bucket plans are kept
        # while the rules they were made from are (by identity), so a new tuple every
        # refresh would have every caller planned afresh every second.
        if rules != self._rules:
            self._rules = rules

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.refresh()
            except Exception as exc:  # keep the last rules while the store is away
                log.warning("runtime_rules_refresh_failed", error=str(exc))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
