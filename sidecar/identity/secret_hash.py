"""The one way a random secret the sidecar issued (a service token's secret, a refresh
token) is stored: its SHA-256. The secrets are 256 random bits, so a fast hash is enough
(there is nothing to brute-force); callers compare with `hmac.compare_digest`."""

from __future__ import annotations

import hashlib


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
