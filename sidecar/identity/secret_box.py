"""Secrets the sidecar keeps in its store (device-login signing keys, the CSRF secret),
encrypted with a key only the operator holds, so a copy of the database or a Redis dump
does not hand out the power to mint tokens.

Fernet (AES-128-CBC with HMAC-SHA256, from `cryptography`): authenticated, so a wrong key or
a tampered value is an error, never garbage. The key comes from an environment variable or a
file (`secrets.key_env`, `secrets.key_file`); without one, device login does not start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from sidecar.store.base import DocumentStore

# Encrypted on first use with the configured key; opening it proves the key is the one
# every secret in this store was sealed with, before anything else is tried.
CHECK_COLLECTION = "device_secrets"
CHECK_ID = "key_check"
_CHECK_TEXT = b"llm-sidecar secret key check"
HOW_TO_MAKE = "make one with `sidecar secret-key`"


class SecretKeyError(Exception):
    """The secret key is missing, malformed, or not the one the store's secrets need."""


def new_key() -> str:
    return Fernet.generate_key().decode()


class SecretBox:
    def __init__(self, key: str, source: str) -> None:
        self.source = source  # "$SIDECAR_SECRET_KEY" or a file path, for error messages
        try:
            self._fernet = Fernet(key.strip().encode())
        except ValueError:
            raise SecretKeyError(
                f"{source} is not a valid secret key (32 url-safe base64 "
                f"bytes, 44 characters); {HOW_TO_MAKE}"
            ) from None

    def seal(self, plain: bytes) -> str:
        return self._fernet.encrypt(plain).decode()

    def open(self, sealed: str) -> bytes:
        try:
            return self._fernet.decrypt(sealed.encode())
        except InvalidToken:
            raise SecretKeyError(
                f"the key in {self.source} does not open the secrets in "
                "the store: they were encrypted with another key"
            ) from None


def load_box(
    key_env: str, key_file: str | None, environ: Mapping[str, str] = os.environ
) -> SecretBox | None:
    """The configured key, the file winning over the environment; None when neither is set."""
    if key_file:
        path = Path(key_file)
        try:
            return SecretBox(path.read_text(encoding="utf-8"), str(path))
        except OSError as exc:
            raise SecretKeyError(
                f"cannot read the secret key file {path}: {exc.strerror}"
            ) from None
    value = environ.get(key_env, "")
    return SecretBox(value, f"${key_env}") if value.strip() else None


async def check_key(store: DocumentStore, box: SecretBox, *, now: float) -> None:
    """Raise SecretKeyError unless `box` holds the key this store's secrets were sealed with."""
    doc = await store.get_doc(CHECK_COLLECTION, CHECK_ID, now=now)
    if doc is None:
        fresh = {"sealed": box.seal(_CHECK_TEXT)}
        if await store.swap_doc(CHECK_COLLECTION, CHECK_ID, None, fresh, now=now):
            return
        doc = await store.get_doc(CHECK_COLLECTION, CHECK_ID, now=now)
        if doc is None:
            raise SecretKeyError("the secret key check vanished from the store")
    if box.open(str(doc["sealed"])) != _CHECK_TEXT:
        raise SecretKeyError(f"the key in {box.source} does not match the store's secrets")
