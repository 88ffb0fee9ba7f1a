"""Everything a running sidecar holds, built once per process and shared by both servers:
the wiring of the parts, and their start and stop. Each part's logic lives in its module."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from sidecar import metrics
from sidecar.admin_access import AdminGate
from sidecar.alerts import Alerts
from sidecar.audit import record
from sidecar.budget.backfill import seed_rules
from sidecar.budget.recent import RecentDecisions
from sidecar.budget.runtime_rules import RuntimeRules
from sidecar.budget.settle import Settler
from sidecar.budget.spool import Spool
from sidecar.config.loader import ConfigError, load_config
from sidecar.config.ruleset import RuleSet, RuleSetHolder, build_ruleset
from sidecar.config.watch import ConfigWatcher
from sidecar.engine import Engine
from sidecar.identity.attempts import Attempts
from sidecar.identity.authenticators import Identities
from sidecar.identity.cli_sessions import CliSessions
from sidecar.identity.device import DeviceLogin, issuer_for
from sidecar.identity.device_setup import open_device_login, secret_box_for
from sidecar.identity.service_tokens import ServiceTokens
from sidecar.settings import SettingsHolder
from sidecar.store.base import Store, StoreUnavailable
from sidecar.store.factory import open_store, store_url

log = structlog.get_logger("sidecar")


@dataclass
class Services:
    holder: RuleSetHolder
    settings: SettingsHolder
    store: Store
    service_tokens: ServiceTokens
    engine: Engine
    runtime_rules: RuntimeRules
    alerts: Alerts
    watcher: ConfigWatcher
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    draining: bool = False
    # Built at start-up when enabled: its issuer must be known before the first request.
    device_login: DeviceLogin | None = None
    cli_sessions: CliSessions | None = None
    # Failed-attempt counters, in the store so limits hold across replicas.
    attempts: Attempts = field(init=False)
    admin_gate: AdminGate = field(init=False)

    def __post_init__(self) -> None:
        # The engine's clock, so one injected clock moves every window a test looks at.
        self.attempts = Attempts(self.store, lambda: self.engine.clock())
        self.admin_gate = AdminGate(self.attempts, self.holder, self.settings, self.engine.identify)

    @property
    def ruleset(self) -> RuleSet:
        return self.holder.current

    async def audit(self, who: str, action: str, target: str, before: Any, after: Any) -> None:
        """Record an admin write in the audit trail (after it was made)."""
        await record(self.store, self.engine.clock(), who, action, target, before, after)

    def refresh_metrics(self) -> None:
        self.engine.utilisation.refresh(self.engine.rules(self.holder.current), time.time())
        self.engine.shedder.export()

    def start_background(self) -> None:
        metrics.on_scrape = self.refresh_metrics
        loop = asyncio.get_running_loop()
        settler = Settler(self.store, self.engine.spool, self.refresh_metrics)
        self.tasks.append(loop.create_task(settler.run()))
        self.tasks.append(loop.create_task(self.engine.shedder.watch_loop()))
        self.runtime_rules.start()
        self.watcher.start()

    async def close(self) -> None:
        await self.runtime_rules.stop()
        await self.watcher.stop()
        await self.alerts.drain()
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.close()
        if self.engine.spool is not None:
            await self.engine.spool.close()


async def build_services(config_path: Path, *, store_owner: bool | None = None) -> Services:
    """`store_owner`: True for the one serving process of a SQLite file, which keeps its
    budgets in memory; False for one of several (`--workers N`, or an ASGI server's
    workers); None for a process that serves nothing on its own (tests, tools)."""
    text = config_path.read_text(encoding="utf-8")
    ruleset = build_ruleset(load_config(config_path), source_text=text, source=str(config_path))
    holder = RuleSetHolder(ruleset)
    device = ruleset.config.identity.device_login
    box = secret_box_for(config_path, ruleset) if device.enabled else None
    store_config = ruleset.config.store
    if store_config.shared and store_owner:
        store_owner = False
    store = await open_store(store_url(config_path, store_config), owner=store_owner)
    tokens = ServiceTokens(store)
    sessions = CliSessions(store)
    identities = Identities(tokens, sessions)
    device_login = None
    if box is not None:
        device_login = DeviceLogin(
            store,
            issuer_for(device.public_url, ruleset.config.listen.http),
            box=box,
            sessions=sessions,
        )
        try:
            await open_device_login(config_path, store, device_login, box)
        except ConfigError:
            await store.close()
            raise
        identities.extra_issuers.append(device_login.issuer_policy)

    async def seed(new: RuleSet) -> None:
        await seed_rules(store, new.rules, time.time())

    try:
        await seed(ruleset)
    except StoreUnavailable as exc:
        log.error("rule_seeding_unavailable", error=str(exc))
    runtime_rules = RuntimeRules(store, ruleset.config.account_id)
    try:
        await runtime_rules.refresh()
    except StoreUnavailable as exc:  # start anyway; the refresh loop catches up
        log.error("runtime_rules_unavailable", error=str(exc))
    settings = SettingsHolder(holder)
    alerts = Alerts(store, holder, settings=settings)
    spool = Spool(ruleset.config.store.spool)
    engine = Engine(
        holder, store, identities, runtime_rules=runtime_rules, alerts=alerts, spool=spool
    )
    engine.observers.append(RecentDecisions(store).observe)
    return Services(
        holder,
        settings,
        store,
        tokens,
        engine,
        runtime_rules,
        alerts,
        ConfigWatcher(config_path, holder, before_swap=seed),
        device_login=device_login,
        cli_sessions=sessions,
    )
