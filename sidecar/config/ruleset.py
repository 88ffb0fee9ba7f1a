"""The compiled, immutable rule set: everything a request needs, built once per config load.

Hot reload builds a new RuleSet off the request path and swaps one reference in the holder;
each request takes one snapshot and uses it throughout.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from sidecar.config.loader import ConfigError
from sidecar.config.models import (
    DefaultPriceConfig,
    DirectoryGrant,
    SidecarConfig,
    SpendLimitConfig,
    WindowConfig,
)
from sidecar.identity.directory import Directory
from sidecar.money import usd_to_micros
from sidecar.policy.allowlist import Allowlist, AllowRule, compile_globs
from sidecar.policy.rules import Rule, Window, compile_rule
from sidecar.policy.windows import FixedWindow, RollingWindow, parse_duration
from sidecar.pricing import PriceBook, UnitPrice, per_mtok_to_pico
from sidecar.providers.credentials import ProviderKeys, build_keys
from sidecar.store.budget_types import AdmissionMode, Measure


@dataclass(frozen=True)
class Provider:
    id: str
    path_prefix: str
    pricing_id: str
    api: str | None = None
    # Azure OpenAI deployment name -> model; None for other APIs.
    deployments: Mapping[str, str] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class FallbackStep:
    model: str
    provider: str | None


@dataclass(frozen=True)
class RuleSet:
    config: SidecarConfig
    version: str
    loaded_at: float
    allowlist: Allowlist
    providers: tuple[Provider, ...]
    rules: tuple[Rule, ...]
    fallbacks: Mapping[str, tuple[FallbackStep, ...]]
    prices: PriceBook
    directory: Directory
    reservation_ttl: int
    default_max_output_tokens: int
    admission_mode: AdmissionMode
    provider_by_id: Mapping[str, Provider] = field(default_factory=dict)
    # Keys the sidecar injects upstream, per provider id (absent: bring your own key).
    provider_keys: Mapping[str, ProviderKeys] = field(default_factory=dict)
    # Whether calls the gateway cannot meter are admitted (sidecar/policy/unmetered.py).
    admit_unmetered: bool = False
    # Whether tiers billed above standard are admitted (sidecar/policy/service_tier.py).
    admit_any_service_tier: bool = False
    # Whether tools whose fees cannot be charged are admitted (sidecar/policy/unpriced_tools.py).
    admit_unpriced_tools: bool = False

    def fallback_chain(self, model: str, canonical: str) -> tuple[FallbackStep, ...]:
        """The configured chain for a model under the name it was asked by (any case), else
        under its canonical name: every spelling of a model falls back the same way."""
        return self.fallbacks.get(model.strip().lower()) or self.fallbacks.get(canonical, ())

    def provider_for_path(self, path: str) -> Provider | None:
        for provider in self.providers:
            if path.startswith(provider.path_prefix):
                return provider
        return None


def window_from_config(window: WindowConfig) -> Window:
    if window.fixed is not None:
        return FixedWindow(window.fixed, window.timezone)
    assert window.rolling is not None
    return RollingWindow(parse_duration(window.rolling))


def limits_of(rule: SpendLimitConfig) -> list[tuple[Measure, int]]:
    """(measure, limit) of each bucket family the rule makes: one, or two for separate input
    and output token limits."""
    if rule.budget_usd is not None:
        return [("usd", usd_to_micros(rule.budget_usd))]
    if rule.requests is not None:
        return [("requests", rule.requests)]
    if isinstance(rule.tokens, int):
        return [("tokens", rule.tokens)]
    assert rule.tokens is not None
    split: list[tuple[Measure, int]] = []
    if rule.tokens.input is not None:
        split.append(("input_tokens", rule.tokens.input))
    if rule.tokens.output is not None:
        split.append(("output_tokens", rule.tokens.output))
    return split


def rules_from_config(rule: SpendLimitConfig, source: str = "file") -> list[Rule]:
    window = window_from_config(rule.window)
    return [
        compile_rule(
            name=rule.name,
            limit=limit,
            window=window,
            filters=rule.filter,
            split=rule.split,
            action=rule.action,
            alerts=rule.alerts,
            source="runtime" if source == "runtime" else "file",
            measure=measure,
        )
        for measure, limit in limits_of(rule)
    ]


def build_ruleset(
    config: SidecarConfig, *, source_text: str = "", source: str = "<config>"
) -> RuleSet:
    """The compiled rule set; ConfigError when a configured provider key is missing (a
    sidecar that would send every call unauthenticated must not start or reload)."""
    provider_keys, missing = build_keys(config)
    if missing:
        raise ConfigError(source, [f"{source}: {line}" for line in missing])
    allowlist = Allowlist(
        default_allow=config.models.default == "allow",
        rules=tuple(
            AllowRule(frozenset(r.groups), compile_globs(r.allow), compile_globs(r.deny))
            for r in config.models.rules
        ),
    )
    providers = tuple(
        sorted(
            (
                Provider(
                    p.id,
                    p.path_prefix,
                    p.pricing_id,
                    p.api,
                    dict(p.deployments) if p.api == "azure_openai" else None,
                )
                for p in config.providers
            ),
            key=lambda p: -len(p.path_prefix),
        )
    )
    unknown = config.pricing.unknown_model
    default_price = (
        UnitPrice(
            input=per_mtok_to_pico(unknown.input_per_mtok),
            output=per_mtok_to_pico(unknown.output_per_mtok),
            cache_read=per_mtok_to_pico(unknown.input_per_mtok),
            cache_write=per_mtok_to_pico(unknown.input_per_mtok),
            source="default",
        )
        if isinstance(unknown, DefaultPriceConfig)
        else None
    )
    prices = PriceBook(config.pricing.overrides, default_price)
    issuers = [i.issuer for i in config.identity.jwt.issuers]
    directory = Directory.build(
        (group, member.issuer, member.email)
        if isinstance(member, DirectoryGrant)
        # A plain address means the one configured issuer (config validation refuses it
        # when there are several); with none configured it grants nothing.
        else (group, issuer, member)
        for group, members in config.identity.directory.groups.items()
        for member in members
        for issuer in ((member.issuer,) if isinstance(member, DirectoryGrant) else issuers)
    )
    version = hashlib.sha256(
        (source_text or json.dumps(config.model_dump(mode="json"), sort_keys=True)).encode()
    ).hexdigest()[:12]
    return RuleSet(
        config=config,
        version=version,
        loaded_at=time.time(),
        allowlist=allowlist,
        providers=providers,
        rules=tuple(c for r in config.spend_limits for c in rules_from_config(r)),
        fallbacks={
            model.strip().lower(): tuple(FallbackStep(t.model, t.provider) for t in chain)
            for model, chain in config.fallbacks.items()
        },
        prices=prices,
        directory=directory,
        reservation_ttl=parse_duration(config.admission.reservation_ttl),
        default_max_output_tokens=config.admission.default_max_output_tokens,
        admission_mode=config.admission.mode,
        provider_by_id={p.id: p for p in providers},
        provider_keys=provider_keys,
        admit_unmetered=config.admission.unmetered_calls == "reserve",
        admit_any_service_tier=config.admission.service_tiers == "standard_price",
        admit_unpriced_tools=config.admission.unpriced_tools == "allow",
    )


class RuleSetHolder:
    """One reference, swapped whole on reload; readers never see a half-built rule set."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.current = ruleset
        self.last_error: str | None = None
        self.reloads = 0

    def swap(self, ruleset: RuleSet) -> None:
        self.current = ruleset
        self.last_error = None
        self.reloads += 1
