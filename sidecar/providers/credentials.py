"""Provider keys held by the sidecar: read from the environment or a file, chosen per group,
and turned into the provider's own auth header for the upstream request.

A key value leaves this module only as an upstream header value. `Secret` never prints its
value (repr, str, errors), and files are re-read when they change (a mounted Kubernetes
Secret is swapped atomically on rotation), so a new key is used without a restart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import structlog

from sidecar.config.models import ProviderConfig, SecretSource, SidecarConfig

log = structlog.get_logger("sidecar.credentials")

Style = Literal["bearer", "anthropic", "azure", "gemini"]
ANTHROPIC_VERSION = "2023-06-01"
# The header each style writes the key into: the one header replaced on the upstream request.
KEY_HEADER: Mapping[Style, str] = {
    "bearer": "authorization",
    "anthropic": "x-api-key",
    "azure": "api-key",
    "gemini": "x-goog-api-key",
}
_API_STYLE: Mapping[str, Style] = {
    "openai": "bearer",
    "openai_compatible": "bearer",
    "workers_ai": "bearer",
    "anthropic": "anthropic",
    "azure_openai": "azure",
    "gemini": "gemini",
}


class SecretMissing(ValueError):
    """A configured secret that cannot be read or is empty; the message names where."""


def style_for(provider: ProviderConfig) -> Style:
    if provider.api is not None:
        return _API_STYLE[provider.api]
    names = f"{provider.id} {provider.pricing_provider or ''}".lower()
    if "anthropic" in names:
        return "anthropic"
    if "azure" in names:
        return "azure"
    if "gemini" in names or "google" in names:
        return "gemini"
    return "bearer"


class Secret:
    """One configured key. Environment variables are read once (a process's environment does
    not change); files are re-read whenever their identity or size or mtime changes."""

    __slots__ = ("_cached", "_source", "_stamp", "where")

    def __init__(self, source: SecretSource, where: str) -> None:
        self._source = source
        self.where = where
        self._stamp: tuple[int, int, int] | None = None
        self._cached = ""

    def __repr__(self) -> str:
        origin = f"env={self._source.env}" if self._source.env else f"file={self._source.file}"
        return f"Secret({origin}, **********)"

    __str__ = __repr__

    def describe(self) -> str:
        return (
            f"environment variable {self._source.env}"
            if self._source.env
            else f"file {self._source.file}"
        )

    def load(self) -> str:
        """The current value; SecretMissing (naming the variable or file) if there is none."""
        if self._source.env is not None:
            if not self._cached:
                self._cached = os.environ.get(self._source.env, "").strip()
            if not self._cached:
                raise SecretMissing(
                    f"{self.where}: environment variable {self._source.env} is not set or empty"
                )
            return self._cached
        path = self._source.file
        assert path is not None
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                with open(path, encoding="utf-8") as handle:
                    value = handle.read().strip()
                if not value:
                    raise SecretMissing(f"{self.where}: file {path} is empty")
                self._cached, self._stamp = value, stamp
        except OSError as exc:
            raise SecretMissing(
                f"{self.where}: file {path} cannot be read: {exc.strerror or exc}"
            ) from None
        return self._cached

    def value(self) -> str:
        """For the request path: the current value, else the last good one. A file caught
        mid-rotation (briefly absent or empty) must not turn into unauthenticated calls."""
        try:
            return self.load()
        except SecretMissing as exc:
            if not self._cached:
                raise
            log.warning("provider_key_unreadable", detail=str(exc), using="last good value")
            return self._cached


@dataclass(frozen=True)
class ProviderKeys:
    style: Style
    default: Secret | None
    by_group: tuple[tuple[str, Secret], ...]

    def secret_for(self, groups: tuple[str, ...]) -> Secret | None:
        # Config order decides when a caller is in several groups with keys of their own.
        for group, secret in self.by_group:
            if group in groups:
                return secret
        return self.default

    def headers(self, groups: tuple[str, ...], client_headers: Mapping[str, str]) -> dict[str, str]:
        """The upstream headers carrying this caller's key; empty when no key applies (a
        by_group-only provider and a caller in none of its groups: bring your own key)."""
        secret = self.secret_for(groups)
        if secret is None:
            return {}
        key = secret.value()
        if self.style == "bearer":
            return {"authorization": f"Bearer {key}"}
        out = {KEY_HEADER[self.style]: key}
        if self.style == "anthropic" and "anthropic-version" not in client_headers:
            out["anthropic-version"] = ANTHROPIC_VERSION
        return out


def build_keys(config: SidecarConfig) -> tuple[dict[str, ProviderKeys], list[str]]:
    """Each provider's keys, and one error line per configured secret that is missing."""
    keys: dict[str, ProviderKeys] = {}
    errors: list[str] = []
    for index, provider in enumerate(config.providers):
        creds = provider.credentials
        if creds is None:
            continue
        where = f"providers[{index}].credentials"
        default = Secret(creds.default, f"{where}.default") if creds.default else None
        by_group = tuple(
            (group, Secret(source, f"{where}.by_group.{group}"))
            for group, source in creds.by_group.items()
        )
        for secret in (default, *(s for _, s in by_group)):
            if secret is None:
                continue
            try:
                secret.load()
            except SecretMissing as exc:
                errors.append(str(exc))
        keys[provider.id] = ProviderKeys(style_for(provider), default, by_group)
    return keys, errors


def injected_headers(
    keys: Mapping[str, ProviderKeys],
    provider_id: str,
    groups: tuple[str, ...],
    client_headers: Mapping[str, str],
) -> dict[str, str]:
    """What the decision adds upstream for a call to `provider_id`; empty without keys."""
    provider = keys.get(provider_id)
    return provider.headers(groups, client_headers) if provider is not None else {}
