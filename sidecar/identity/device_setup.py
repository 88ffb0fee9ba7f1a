"""Device login at start-up: the secret key its stored secrets are sealed with, checked
against the store before the first request, and plain secrets of older versions sealed."""

from __future__ import annotations

import time
from pathlib import Path

import structlog

from sidecar.config.loader import ConfigError
from sidecar.config.ruleset import RuleSet
from sidecar.identity.device import DeviceLogin
from sidecar.identity.secret_box import (
    HOW_TO_MAKE,
    SecretBox,
    SecretKeyError,
    check_key,
    load_box,
)
from sidecar.store.base import Store, StoreUnavailable

log = structlog.get_logger("sidecar")


def secret_box_for(config_path: Path, rs: RuleSet) -> SecretBox:
    """The key for device login's secrets; a missing or malformed one stops the start-up."""
    secrets = rs.config.secrets
    try:
        box = load_box(secrets.key_env, secrets.key_file)
    except SecretKeyError as exc:
        raise ConfigError(str(config_path), [f"{config_path}: secrets: {exc}"]) from None
    if box is None:
        raise ConfigError(
            str(config_path),
            [
                f"{config_path}: identity.device_login is enabled, and its signing keys and CSRF "
                f"secret are kept in the store encrypted: set ${secrets.key_env} (secrets.key_env) "
                f"or secrets.key_file to a secret key; {HOW_TO_MAKE}"
            ],
        )
    return box


async def open_device_login(
    config_path: Path, store: Store, login: DeviceLogin, box: SecretBox
) -> None:
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
