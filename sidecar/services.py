"""Everything a running sidecar holds, built once per process and shared by both servers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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
from sidecar.budget.spool import Spool
from sidecar.config.loader import ConfigError, load_config
from sidecar.config.ruleset import RuleSet, RuleSetHolder, build_ruleset
from sidecar.config.watch import ConfigWatcher
from sidecar.engine import Engine
from sidecar.identity.attempts import Attempts
from sidecar.identity.authenticate import Authenticator
from sidecar.identity.cli_sessions import CliSessions
from sidecar.identity.device import DeviceLogin, issuer_for
from sidecar.identity.jwks import JwksCache
from sidecar.identity.jwt_verify import IssuerPolicy, JwtVerifier
from sidecar.identity.secret_box import (
    HOW_TO_MAKE,
    SecretBox,
    SecretKeyError,
    check_key,
    load_box,
)
from sidecar.identity.service_tokens import ServiceTokens
from sidecar.metrics import RESERVATIONS_OPEN
from sidecar.store.base import Store, StoreUnavailable
from sidecar.store.factory import open_store, store_url

log = structlog.get_logger("sidecar")
# Seconds between refreshes of the budget gauges (a scrape of a single process refreshes too).
BUDGET_GAUGES_EVERY = 10


class Identities:
    """Builds the authenticator for a rule set, keeping JWKS caches across reloads."""

    def __init__(self, service_tokens: ServiceTokens, sessions: CliSessions) -> None:
        self._service_tokens = service_tokens
        self._sessions = sessions
        self._jwks: dict[tuple[str | None, str | None], JwksCache] = {}
        self._built: tuple[str, Authenticator] | None = None
        self.extra_issuers: list[IssuerPolicy] = []

    def jwks(self, url: str | None, file: str | None, floor: float, max_age: float) -> JwksCache:
        key = (url, file)
        if key not in self._jwks:
            self._jwks[key] = JwksCache(url=url, file=file, refresh_floor_seconds=floor,
                                        cache_seconds=max_age)
        return self._jwks[key]

    def __call__(self, rs: RuleSet) -> Authenticator:
        if self._built is not None and self._built[0] == rs.version:
            return self._built[1]
        policies = [
            IssuerPolicy(
                issuer=i.issuer, audiences=i.audiences, algorithms=i.algorithms,
                groups_claim=i.groups_claim, leeway_seconds=i.leeway_seconds,
                keys=self.jwks(i.jwks_url, i.jwks_file, i.refresh_floor_seconds,
                               i.cache_seconds),
            )
            for i in rs.config.identity.jwt.issuers
        ]
        verifier = JwtVerifier([*policies, *self.extra_issuers], rs.directory)
        tokens = self._service_tokens if rs.config.identity.service_tokens.enabled else None
        auth = Authenticator(verifier, tokens, self._sessions)
        self._built = (rs.version, auth)
        return auth


@dataclass
class Services:
    config_path: Path
    holder: RuleSetHolder
    store: Store
    service_tokens: ServiceTokens
    identities: Identities
    engine: Engine
    runtime_rules: RuntimeRules
    alerts: Alerts
    watcher: ConfigWatcher
    started_at: float = field(default_factory=time.time)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    store_healthy: bool = True
    draining: bool = False
    # Built at start-up when enabled: its issuer must be known before the first request.
    device_login: DeviceLogin | None = None
    cli_sessions: CliSessions | None = None
    # Failed-attempt counters, in the store so limits hold across replicas.
    attempts: Attempts = field(init=False)

    def __post_init__(self) -> None:
        # The engine's clock, so one injected clock moves every window a test looks at.
        self.attempts = Attempts(self.store, lambda: self.engine.clock())

    @property
    def ruleset(self) -> RuleSet:
        return self.holder.current

    async def audit(self, who: str, action: str, target: str, before: Any, after: Any) -> None:
        """Record an admin write in the audit trail (after it was made)."""
        await record(self.store, self.engine.clock(), who, action, target, before, after)

    @property
    def admin_gate(self) -> AdminGate:
        return AdminGate(self.attempts)

    def refresh_metrics(self) -> None:
        self.engine.utilisation.refresh(self.engine.rules(self.holder.current), time.time())

    async def _settle_loop(self) -> None:
        for tick in itertools.count(1):
            await asyncio.sleep(1.0)
            try:
                await self.store.settle_expired(time.time())
                if self.engine.spool is not None:
                    await self.engine.spool.replay(self.store, time.time())
                RESERVATIONS_OPEN.set(await self.store.open_reservations())
                self.store_healthy = True
            except Exception as exc:  # keep the loop alive whatever the store does
                self.store_healthy = False
                log.warning("settle_failed", error=str(exc))
            if tick % BUDGET_GAUGES_EVERY == 0:
                # Each worker keeps its gauges current itself (under --workers a scrape runs
                # in one worker and reads all their values); a pass goes over every bucket
                # seen, so not every second.
                self.refresh_metrics()

    def start_background(self) -> None:
        metrics.on_scrape = self.refresh_metrics
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._settle_loop()))
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


def _secret_box(config_path: Path, rs: RuleSet) -> SecretBox:
    """The key for device login's secrets; a missing or malformed one stops the start-up."""
    secrets = rs.config.secrets
    try:
        box = load_box(secrets.key_env, secrets.key_file)
    except SecretKeyError as exc:
        raise ConfigError(str(config_path), [f"{config_path}: secrets: {exc}"]) from None
    if box is None:
        raise ConfigError(str(config_path), [
            f"{config_path}: identity.device_login is enabled, and its signing keys and CSRF "
            f"secret are kept in the store encrypted: set ${secrets.key_env} (secrets.key_env) "
            f"or secrets.key_file to a secret key; {HOW_TO_MAKE}"])
    return box


async def _open_device_login(config_path: Path, store: Store, login: DeviceLogin,
                             box: SecretBox) -> None:
    try:
        await check_key(store, box, now=time.time())
        sealed = await login.seal_plain_secrets()
    except SecretKeyError as exc:
        raise ConfigError(str(config_path), [f"{config_path}: secrets: {exc}"]) from None
    except StoreUnavailable as exc:  # checked again when the first secret is opened
        log.error("secret_key_check_unavailable", error=str(exc))
        return
    if sealed:
        log.info("stored_secrets_encrypted", count=sealed)


async def build_services(config_path: Path) -> Services:
    text = config_path.read_text(encoding="utf-8")
    ruleset = build_ruleset(load_config(config_path), source_text=text,
                            source=str(config_path))
    holder = RuleSetHolder(ruleset)
    device = ruleset.config.identity.device_login
    box = _secret_box(config_path, ruleset) if device.enabled else None
    store = await open_store(store_url(config_path, ruleset.config.store))
    tokens = ServiceTokens(store)
    sessions = CliSessions(store)
    identities = Identities(tokens, sessions)
    device_login = None
    if box is not None:
        device_login = DeviceLogin(store, issuer_for(device.public_url,
                                                     ruleset.config.listen.http), box=box,
                                   sessions=sessions)
        try:
            await _open_device_login(config_path, store, device_login, box)
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
    alerts = Alerts(store, holder)
    spool = Spool(ruleset.config.store.spool)
    engine = Engine(holder, store, identities, runtime_rules=runtime_rules, alerts=alerts,
                    spool=spool)
    engine.observers.append(RecentDecisions(store).observe)
    return Services(config_path, holder, store, tokens, identities, engine, runtime_rules,
                    alerts, ConfigWatcher(config_path, holder, before_swap=seed),
                    device_login=device_login, cli_sessions=sessions)
