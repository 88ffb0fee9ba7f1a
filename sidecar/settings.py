"""Process settings: what the sidecar takes from its environment (the admin and ingress
tokens, webhook signing secrets), read when a rule set is loaded, never on a request.

The policy file names the variables; their values are read once for each rule set the
holder swaps in (at start and on every reload), so a request compares against a value in
memory and a reload that renames a variable takes effect with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from sidecar.config.models import SidecarConfig
from sidecar.config.ruleset import RuleSet, RuleSetHolder


@dataclass(frozen=True)
class Settings:
    admin_token: str = ""
    ingress_token: str = ""
    # Webhook signing secrets by the variable that holds them.
    webhook_secrets: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return "Settings(**********)"


def read_settings(config: SidecarConfig, environ: Mapping[str, str] = os.environ) -> Settings:
    hooks = [h.secret_env for h in config.alerts.webhooks if h.secret_env]
    return Settings(
        admin_token=environ.get(config.admin.token_env, ""),
        ingress_token=environ.get(config.admin.ingress_token_env, ""),
        webhook_secrets={name: environ.get(name, "") for name in hooks},
    )


class SettingsHolder:
    """The settings of the holder's current rule set, read again only when it is swapped."""

    def __init__(self, holder: RuleSetHolder, environ: Mapping[str, str] = os.environ) -> None:
        self._holder = holder
        self._environ = environ
        self._for: RuleSet | None = None
        self._settings = Settings()

    @property
    def current(self) -> Settings:
        rs = self._holder.current
        if rs is not self._for:
            self._settings = read_settings(rs.config, self._environ)
            self._for = rs
        return self._settings
